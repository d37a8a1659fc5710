"""``GraphRunner``: a forward that replays a captured recording per input key, eager where it cannot.

Per call: flatten the arguments (``tree.flatten``) into tensors and a key (their shapes, strides, dtypes,
devices; every non-tensor argument by value: which optional inputs are None, ``return_dict``,
``joint_attention_kwargs``; plus inference mode and autocast). A new key is captured: static input
buffers are allocated like the call's tensors and filled with ``copy_``, the backend warms the forward up
and records it on them; then (and for every later call with that key) the inputs are copied into the
static buffers, the recording is replayed and the outputs are returned.

Outputs are cloned out of the static output buffers by default. ``GraphConfig.alias_outputs=True``
returns the static buffers themselves (no copy): they are overwritten by the next replay of that key, so a
caller may only keep them until its next forward call. A plain denoising loop respects that; a pipeline
that calls the transformer twice per step and keeps the first output (FLUX's true CFG with a negative
prompt, SD3's skip-layer guidance) does not, and neither do the per-block runners of the step cache, which
refuse it.

At most ``max_keys`` recordings are kept (and at most ``max_bytes`` of static buffers and capture growth,
when set), least recently used evicted first; a key that comes back is captured again. Once 2 x
``max_keys`` recordings were evicted after a single use, the inputs change layout on almost every call
(e.g. a Python float timestep, which is part of the key) and capturing costs more than it saves: the
runner releases everything and runs eagerly, saying so (``reset()`` starts over).

A recording replays the modules and parameter tensors it was captured with, so a module of a graphed
model (``module``, watched with all its submodules) getting a submodule or a parameter assigned (peft
injecting LoRA layers, a module swap, a new weight ``Parameter``), or its parameters and buffers moving
to other memory (``.to()``, ``.half()``, ``weight.data = ...``: checked by address on every call),
releases every recording and captures afresh (``stats["invalidations"]``); in-place weight updates
(``copy_``, ``load_state_dict``) need nothing. Python-level settings the
forward reads (LoRA adapter scales, the attention backend) are not seen: ``reset()`` after changing them.

A key whose capture fails runs eagerly from then on, the reason reported once (``on_fallback``); a call
that cannot be keyed (autograd enabled, an argument of an unknown type, tensors the backend refuses)
runs eagerly, each distinct reason reported once. Nothing here raises into the caller's generation
except the forward's own errors.
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules import module as nn_module

from dit_kernels.graphs.tree import Unsupported, describe, flatten, rebuild

log = logging.getLogger("dit_kernels")

class _StructureWatch:
    """Counts submodule / parameter assignments (``module.<name> = value``) to the modules of graphed models
    (``modules``), through torch's global registration hooks, which see every such assignment in the
    process (``ModuleList`` slices in a forward included). The hooks are registered only while at least one
    runner that watches a module exists (``acquire`` / ``release``), never at import."""

    def __init__(self):
        self.modules: weakref.WeakSet = weakref.WeakSet()
        self.changes = 0
        self.handles: list = []
        self._runners = 0

    def _changed(self, module: nn.Module, name: str, value) -> None:
        if module in self.modules:
            self.changes += 1

    def acquire(self) -> None:
        if self._runners == 0:
            self.handles = [nn_module.register_module_module_registration_hook(self._changed),
                            nn_module.register_module_parameter_registration_hook(self._changed)]  # fmt: skip
        self._runners += 1

    def release(self) -> None:
        self._runners -= 1
        if self._runners == 0:
            for handle in self.handles:
                handle.remove()
            self.handles = []


_WATCH = _StructureWatch()


@dataclass
class GraphConfig:
    """``max_keys``: recordings kept (LRU); ``max_bytes``: optional cap on their accounted bytes;
    ``warmup``: eager runs before each capture; ``alias_outputs``: return the static output buffers
    (see the module docstring) instead of clones. ``backend``: what records and replays, for
    ``patch(..., cuda_graphs=GraphConfig(...))``: None is ``CudaGraphBackend()``; ``EagerReplayBackend()``
    runs the same logic on any device (how the tests exercise it on CPU)."""

    max_keys: int = 8
    max_bytes: Optional[int] = None
    warmup: int = 2
    alias_outputs: bool = False
    backend: Optional[object] = None


@dataclass
class _Entry:
    """One captured key: its static input buffers, the backend's recording, the output skeleton."""

    inputs: list[Tensor]
    handle: object
    outputs: list[Tensor]
    out_skeleton: Hashable
    input_bytes: int
    capture_bytes: int
    replays: int = 0

    @property
    def nbytes(self) -> int:
        return self.input_bytes + self.capture_bytes


class GraphRunner:
    """Callable like ``forward`` (of ``module``, whose structure is watched; None: not watched); see the
    module docstring. ``stats`` counts captures, replays, eager calls, evictions, invalidations and
    failures; ``failed`` maps each key whose capture failed to the reason."""

    def __init__(self, forward: Callable, backend, config: Optional[GraphConfig] = None,
                 on_fallback: Callable[[str], None] = lambda why: None,
                 module: Optional[nn.Module] = None, may_alias: bool = True):  # fmt: skip
        self.forward = forward
        self.module = module
        if module is not None:  # the structure hooks live as long as a runner watching a module does
            _WATCH.acquire()
            weakref.finalize(self, _WATCH.release)
        self.may_alias = may_alias  # False: outputs always cloned (``alias_outputs`` reported as refused)
        self.backend = backend
        self.config = config or GraphConfig()
        self.on_fallback = on_fallback
        self.stats: Counter = Counter()
        self.failed: dict[Hashable, str] = {}
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._reported: set[str] = set()
        self._single_use = 0  # recordings evicted after one replay
        self.disabled: Optional[str] = None  # why the runner stopped capturing
        self.reset()

    # ------------------------------------------------------------------------------------- call

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # torch.compile traces the forward itself (and has its own graphs)
            return self.forward(*args, **kwargs)
        if self._structure != _WATCH.changes or self._weights != self._weights_now():
            self.stats["invalidations"] += bool(self._entries)
            self.reset()
        keyed = self.disabled or self._key(args, kwargs)
        if isinstance(keyed, str):
            return self._eager(keyed, args, kwargs)
        key, tensors = keyed
        if key in self.failed:
            return self._eager(self.failed[key], args, kwargs)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._capture(key, tensors)
            if entry is None:
                return self._eager(self.disabled or self.failed[key], args, kwargs)
        else:
            self._entries.move_to_end(key)
            for static, t in zip(entry.inputs, tensors):
                static.copy_(t)
        self.backend.replay(entry.handle)
        self.stats["replays"] += 1
        entry.replays += 1
        return rebuild(entry.out_skeleton, entry.outputs if self._aliases() else [t.clone() for t in entry.outputs])

    def _aliases(self) -> bool:
        if self.config.alias_outputs and not self.may_alias:
            self._report("alias_outputs is refused here (a per-block runner's outputs are read after later "
                         "blocks replay); outputs are cloned")  # fmt: skip
        return self.config.alias_outputs and self.may_alias

    def _key(self, args: tuple, kwargs: dict):
        """``(key, tensors)``, or the reason (a str) this call cannot be captured."""
        if torch.is_grad_enabled():
            return "autograd is enabled (graphs replay only under torch.no_grad() or torch.inference_mode())"
        try:
            tensors, skeleton = flatten((args, kwargs))
        except Unsupported as err:
            return f"the call has {err}"
        refused = self.backend.refuse(tensors)
        if refused:
            return refused
        devices = {t.device.type for t in tensors}
        autocast = tuple((d, torch.get_autocast_dtype(d)) for d in sorted(devices) if torch.is_autocast_enabled(d))
        return (skeleton, torch.is_inference_mode_enabled(), autocast), tensors

    def _eager(self, why: str, args: tuple, kwargs: dict):
        self.stats["eager"] += 1
        self._report(why)
        return self.forward(*args, **kwargs)

    def _report(self, why: str) -> None:
        if why not in self._reported:
            self._reported.add(why)
            log.warning("dit_kernels CUDA graphs: eager fallback: %s", why)
            self.on_fallback(why)

    # ------------------------------------------------------------------------------------- capture

    def _capture(self, key: Hashable, tensors: list[Tensor]) -> Optional[_Entry]:
        """Allocate and fill static inputs, warm up and record; None (reason in ``failed``) on failure."""
        skeleton = key[0]
        inputs = [torch.empty_like(t).copy_(t) for t in tensors]
        out_skeletons: list[Hashable] = []

        def run_static() -> list[Tensor]:
            args, kwargs = rebuild(skeleton, inputs)
            outputs, out_skeleton = flatten(self.forward(*args, **kwargs))
            out_skeletons.append(out_skeleton)
            return outputs

        try:
            captured = self.backend.capture(run_static, self.config.warmup)
        except Exception as err:  # noqa: BLE001 - any failure means: this key runs eagerly, with the reason
            self.stats["failures"] += 1
            self.failed[key] = f"inputs ({describe(skeleton)}): capture failed ({_first_cause(err)}); this input " \
                               "layout runs eagerly"  # fmt: skip
            return None
        self.stats["captures"] += 1
        entry = _Entry(inputs, captured.handle, captured.outputs, out_skeletons[-1],
                       sum(t.nbytes for t in inputs), captured.nbytes)  # fmt: skip
        self._entries[key] = entry
        self._evict()
        return None if self.disabled else entry

    def _evict(self) -> None:
        """Drop least recently used recordings beyond ``max_keys`` / ``max_bytes`` (never the newest); switch
        capturing off when 2 x ``max_keys`` of them were used only once (see the module docstring)."""
        cap = self.config.max_bytes
        while len(self._entries) > 1 and (len(self._entries) > self.config.max_keys or (cap and self.nbytes > cap)):
            _, entry = self._entries.popitem(last=False)
            self.backend.release(entry.handle)
            self.stats["evictions"] += 1
            self._single_use += entry.replays <= 1
        single_use = self._single_use
        if single_use >= 2 * self.config.max_keys:
            self.reset()
            self.disabled = (f"{single_use} recordings were evicted after a single use: the inputs change "
                             "layout (or a Python scalar argument changes value) on almost every call; capturing "
                             "is switched off for this model")  # fmt: skip

    # ------------------------------------------------------------------------------------- introspection

    @property
    def keys(self) -> list[Hashable]:
        """Captured keys, least recently used first."""
        return list(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes accounted to the kept recordings: static inputs plus what each capture kept allocated
        (on CUDA the ``torch.cuda.memory_allocated`` growth across the capture, i.e. its static outputs)."""
        return sum(entry.nbytes for entry in self._entries.values())

    def reset(self) -> None:
        """Release every recording, forget failures and capture afresh (after changing a Python-level
        setting the forward reads, which a recording cannot see)."""
        while self._entries:
            self.backend.release(self._entries.popitem()[1].handle)
        self.failed.clear()
        self._single_use, self.disabled, self._structure = 0, None, _WATCH.changes
        self._weights = self._weights_now()
        if self.module is not None:  # modules added since (LoRA layers) are watched too
            _WATCH.modules.update(self.module.modules())

    def _weights_now(self) -> tuple:
        """Where the watched module's parameters and buffers live: ``.to()``, ``.half()`` or a ``.data =``
        rebinding (peft's merge) moves them without registering anything, and a recording would read the
        old addresses."""
        if self.module is None:
            return ()
        return tuple(t.data_ptr() for t in (*self.module.parameters(), *self.module.buffers()))


def _first_cause(err: BaseException) -> str:
    """The error that started it: a failed CUDA capture raises "invalidated" from ``capture_end`` in the
    context of the op that broke it (a host sync, an unsupported call), which is the useful part."""
    while err.__context__ is not None:
        err = err.__context__
    return f"{type(err).__name__}: {err}"
