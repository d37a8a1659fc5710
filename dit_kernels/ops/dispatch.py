"""What every op family file shares between its launcher table and its callers.

Each family file has the same parts, in this order: the reference (pure torch, the spec), the Triton
kernel(s), the CUDA launchers where csrc has a kernel, the launcher table ``_LAUNCHERS`` (backend ->
launcher, "torch" -> the reference), the custom ops ``_CUSTOM_OPS`` (one ``dit_kernels::<family>_<backend>``
op per launcher, made by ``_register_ops``), validation, the public ops and ``aot_specs``. A public op
resolves its ``backend`` argument unless it is already ``backends.Resolved`` (a patched model resolves
once, at patch time), then ``_run`` calls the launcher directly when ``launch_directly(backend)``, else
the custom op.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from dit_kernels import backends


def concrete_backend(backend: Optional[str], device: torch.device) -> backends.Resolved:
    """``backend`` as it is when already resolved, else ``backends.resolve(backend, device)``."""
    return backend if isinstance(backend, backends.Resolved) else backends.resolve(backend, device)


def via_dispatcher() -> bool:
    """True when a fused launch must be one torch custom op: while torch.compile traces (an opaque node
    with a fake), or while a ``TorchDispatchMode`` watches (a FakeTensorMode, the bench's launch counter):
    the mode then sees ``dit_kernels::...`` as one op and not the aten ops inside it. Plain eager calls
    skip the dispatcher."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def launch_directly(backend: str) -> bool:
    """Call the launcher itself: in plain eager calls, and for the "torch" reference under torch.compile
    (traced through, so the compiler fuses its aten ops)."""
    return not via_dispatcher() or (backend == "torch" and torch.compiler.is_compiling())


def register_custom_op(family: str, backend: str, fn: Callable, *, mutates_args=(), fake: Optional[Callable] = None):
    """``fn`` as the custom op ``dit_kernels::<family>_<backend>``. The Triton one is a ``triton_op``, whose
    fake comes from tracing its launcher; the others get ``fake`` (outputs allocated, nothing computed)."""
    name = f"dit_kernels::{family}_{backend}"
    if backend == "triton":
        return torch.library.triton_op(name, fn, mutates_args=mutates_args)
    op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
    op.register_fake(fake)
    return op


def row_alignment(tensors, strides) -> int:
    """A Triton launcher's ``ALIGN``: 8 when every stride and every tensor's element offset is a multiple
    of 8 (rows start 16-byte aligned for 16-bit data: the kernel may use 16-byte vectors), else 1. The
    kernels take strides divided by ALIGN and multiply back by the constexpr, which tells Triton what it
    cannot infer from a stride such as 72 or 88 (its launcher only specializes multiples of 16).
    Intermediate alignments count as 1: the AOT check compiles exactly these two cases (a 4-byte
    alignment compiled attention into larger cp.async staging that spilled on sm_90a)."""
    values = (*strides, *(t.storage_offset() for t in tensors))
    return 8 if all(value % 8 == 0 for value in values) else 1
