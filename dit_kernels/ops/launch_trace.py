"""Which fused ops a forward launches and the bytes each moves: the patched side of the launch and traffic
model (``dit_kernels.bench.traffic``). Every public fused op is one kernel launch (``qk_norm_rope`` covers
q, k and v in one launch); it reads its tensor arguments and writes its results (``out_*`` buffers are
written, not read). Tracing is off unless a ``LaunchTracer`` is active: then the only cost is one check of
a module-level list per op call."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from torch import Tensor

_ACTIVE: list["LaunchTracer"] = []


@dataclass(frozen=True)
class FusedLaunch:
    name: str
    read_bytes: int
    written_bytes: int


@dataclass
class LaunchTracer:
    """``with LaunchTracer() as tracer: model(...)``; ``tracer.launches`` lists the fused ops called.

    ``inside_fused_op`` is true while a fused op runs, so a dispatch-level counter can skip the aten ops
    of its reference implementation (they are one kernel on the GPU)."""

    launches: list[FusedLaunch] = field(default_factory=list)
    depth: int = 0

    @property
    def inside_fused_op(self) -> bool:
        return self.depth > 0

    def __enter__(self) -> "LaunchTracer":
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)


def tensor_bytes(value) -> int:
    """Bytes of every tensor in ``value`` (a tensor, or a tuple/list of them; anything else counts 0)."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def fused_op(name: str):
    """Decorator for a public fused op: when a tracer is active, record one launch of ``name``."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if not _ACTIVE:
                return fn(*args, **kwargs)
            tracer = _ACTIVE[-1]
            tracer.depth += 1
            try:
                result = fn(*args, **kwargs)
            finally:
                tracer.depth -= 1
            if tracer.depth == 0:
                read = tensor_bytes(args) + sum(tensor_bytes(v) for k, v in kwargs.items() if not k.startswith("out_"))
                tracer.launches.append(FusedLaunch(name, read, tensor_bytes(result)))
            return result

        return call

    return wrap
