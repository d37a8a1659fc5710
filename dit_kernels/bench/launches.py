"""Which fused ops a forward launches and the bytes each moves: the patched side of the launch and traffic
model (``dit_kernels.bench.traffic``).

While a ``TorchDispatchMode`` is active, every public fused op runs as one torch custom op
``dit_kernels::<op>_<backend>`` (``dit_kernels.ops.dispatch``), and the mode sees that op, not the aten ops
inside it. ``LaunchTracer`` is such a mode: one ``FusedLaunch`` per custom op, which reads its tensor
arguments and writes its results and the arguments it mutates (``qk_norm_rope``'s rows of a joint buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

NAMESPACE = "dit_kernels"


@dataclass(frozen=True)
class FusedLaunch:
    name: str  # the custom op's name, e.g. "norm_modulate_torch", "qk_norm_rope_into_triton"
    read_bytes: int
    written_bytes: int


def tensor_bytes(value) -> int:
    """Bytes of every tensor in ``value`` (a tensor, or a tuple/list of them; anything else counts 0)."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def is_fused_op(func) -> bool:
    """Whether an op seen by a dispatch mode is one of dit_kernels' fused launches."""
    return func.namespace == NAMESPACE


def fused_operands(func, args, kwargs, out) -> tuple[list, list]:
    """(read, written) operands of custom op ``func`` called with ``args``/``kwargs``, returning ``out``:
    arguments the schema marks as written (``Tensor(a!)``) and ``out`` are written, the other arguments read."""
    values = dict(zip((a.name for a in func._schema.arguments), args)) | (kwargs or {})
    written = {a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    read = [v for name, v in values.items() if name not in written]
    return read, [v for name, v in values.items() if name in written] + [out]


def fused_launch(func, args, kwargs, out) -> FusedLaunch:
    """The launch of custom op ``func`` (its operands: ``fused_operands``)."""
    read, written = fused_operands(func, args, kwargs, out)
    return FusedLaunch(func.overloadpacket.__name__, tensor_bytes(read), tensor_bytes(written))


class LaunchTracer(TorchDispatchMode):
    """``with LaunchTracer() as tracer: model(...)``; ``tracer.launches`` lists the fused ops called."""

    def __init__(self):
        super().__init__()
        self.launches: list[FusedLaunch] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if is_fused_op(func):
            self.launches.append(fused_launch(func, args, kwargs, out))
        return out
