"""How a captured forward is recorded and replayed: ``CudaGraphBackend`` (``torch.cuda.CUDAGraph``) and
``EagerReplayBackend`` (CPU: "replay" re-runs the function), behind one small interface.

``capture(fn, warmup)`` runs ``fn`` (a closure over static input buffers that returns a list of output
tensors) ``warmup`` times eagerly, then records it, and returns a ``Captured``: the handle to replay, the
static output tensors each replay rewrites, and the bytes the capture kept. ``replay(handle)`` rewrites
those outputs from the current contents of the static inputs; ``release(handle)`` frees the recording.
``refuse(tensors)`` says why a call's tensors cannot be captured by this backend (None: they can).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

Fn = Callable[[], list[Tensor]]


@dataclass
class Captured:
    """A recorded forward: ``handle`` for replay/release, its static ``outputs``, ``nbytes`` it keeps."""

    handle: object
    outputs: list[Tensor]
    nbytes: int


class CudaGraphBackend:
    """``torch.cuda.CUDAGraph`` capture and replay; every graph allocates from one memory pool.

    Warm-up runs on a side stream (as PyTorch requires before capture); it is also what runs Triton's
    autotuning and lazy initialisations (cuBLAS handles, flash-attention workspaces) outside the capture.
    ``capture_error_mode`` is ``torch.cuda.graph``'s: with "thread_local" (default) a CUDA call that is
    unsafe during capture made by this thread (a host sync, a pageable copy) fails the capture, and the
    runner runs that key eagerly, instead of a wrong graph; "global" also fails on such calls from any
    other thread (the strictest, for tests), "relaxed" only on what cannot be captured at all.

    Sharing the pool across keys is safe because only the static outputs of each graph stay allocated:
    a graph's intermediates may reuse memory that holds another graph's static outputs, so those are
    valid only until the next replay of any key (the runner clones them out unless told otherwise)."""

    name = "cuda"
    device_type = "cuda"  # the device a model must be on

    def __init__(self, capture_error_mode: str = "thread_local"):
        self.capture_error_mode = capture_error_mode
        self.pool = None

    def refuse(self, tensors: list[Tensor]) -> Optional[str]:
        """Inputs must all be on the current CUDA device: CPU tensors would be baked into the graph, and
        work on another device would not be on the capturing stream."""
        devices = sorted({str(t.device) for t in tensors})
        if devices != [f"cuda:{torch.cuda.current_device()}"]:
            return (f"tensor inputs on {', '.join(devices) or 'no device'}, not all on the current CUDA device "
                    f"cuda:{torch.cuda.current_device()} (move them there, or torch.cuda.set_device the model's)")
        return None

    def capture(self, fn: Fn, warmup: int) -> Captured:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        before, caller = torch.cuda.memory_allocated(), torch.cuda.current_stream()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode=self.capture_error_mode):
                outputs = fn()
        finally:  # torch.cuda.graph leaves its capture stream current when ending a failed capture raises
            torch.cuda.set_stream(caller)
        torch.cuda.synchronize()
        return Captured(graph, outputs, torch.cuda.memory_allocated() - before)

    def replay(self, handle: torch.cuda.CUDAGraph) -> None:
        handle.replay()

    def release(self, handle: torch.cuda.CUDAGraph) -> None:
        handle.reset()


# Ops that read device data on the host (a sync) or whose output shape depends on values; both fail a
# CUDA graph capture. ``lift_fresh`` is ``torch.tensor(host data)``: on CUDA a pageable host-to-device copy.
HOST_SYNC_OPS = frozenset(
    ("_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2", "unique_dim",
     "unique_consecutive", "bincount", "lift_fresh")
)  # fmt: skip


class HostSyncError(RuntimeError):
    """An op in a captured function would sync the host or have a data-dependent shape."""


class _SyncAudit(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_SYNC_OPS:
            raise HostSyncError(f"{func} syncs the host or has a data-dependent shape; it cannot be captured")
        return func(*args, **(kwargs or {}))


@dataclass
class _Recording:
    fn: Fn
    outputs: list[Tensor]


@dataclass
class EagerReplayBackend:
    """The runner's logic without a GPU: "capture" records ``fn`` and the tensors it returned (the static
    outputs), "replay" runs ``fn`` again and copies its results into them, as a graph replay rewrites its
    outputs in place. A replay whose outputs change shape or dtype raises (a graph could not have
    produced them: control flow depended on tensor values).

    ``strict=True`` audits the captured run under a dispatch mode: any op in ``HOST_SYNC_OPS`` (``.item()``,
    ``bool(tensor)``, ``nonzero``, ``torch.tensor(...)``, ...) fails the capture, as it would on CUDA. Ops
    inside a custom op (our kernels) are not seen; device-to-host copies are invisible on CPU.
    ``calls`` counts every run of a captured function (warm-ups, capture, replays), for tests."""

    strict: bool = False
    name: str = "eager-replay"
    device_type: Optional[str] = None  # runs on any device
    calls: int = field(default=0, init=False)

    def refuse(self, tensors: list[Tensor]) -> Optional[str]:
        return None

    def capture(self, fn: Fn, warmup: int) -> Captured:
        for _ in range(warmup):
            self._run(fn)
        if self.strict:
            with _SyncAudit():
                outputs = self._run(fn)
        else:
            outputs = self._run(fn)
        return Captured(_Recording(fn, outputs), outputs, sum(t.nbytes for t in outputs))

    def replay(self, handle: _Recording) -> None:
        fresh = self._run(handle.fn)
        for static, new in zip(handle.outputs, fresh, strict=True):
            if (static.shape, static.dtype) != (new.shape, new.dtype):
                raise RuntimeError(f"replay produced {list(new.shape)} {new.dtype}, captured {list(static.shape)} "
                                   f"{static.dtype}: the forward's shapes depend on tensor values")  # fmt: skip
            static.copy_(new)

    def release(self, handle: _Recording) -> None:
        handle.outputs.clear()

    def _run(self, fn: Fn) -> list[Tensor]:
        self.calls += 1
        return fn()
