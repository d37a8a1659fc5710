"""What every family patcher uses: the swap recorder that makes ``unpatch`` exact, the op backends a
patch resolved, and the fused attention front-end (per-head QK norm + RoPE written straight into one
joint [B, S_total, H, Dh] buffer per q/k/v, then ``joint_attention``).

Patchers never fuse or copy weights: they call the model's own ``nn.Linear`` modules, so LoRA layers
that peft injects before or after ``patch`` keep working, and the state dict never changes.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from dit_kernels.ops import joint_attention, qk_norm_rope

_MISSING = object()


@dataclass(frozen=True)
class OpBackends:
    """The backend each op family runs with in a patched model.

    ``fused``: for the norm/modulate family and ``qk_norm_rope`` ("torch", "triton", "cuda", "cuda_emu").
    ``attention``: for ``joint_attention``; None lets it choose per call (FlashAttention, our Triton kernel
    for head dims 72/88, SDPA; see ``dit_kernels.ops.attention_backend``)."""

    fused: str
    attention: Optional[str]


@dataclass
class Patcher:
    """Applies a family's replacements and records each one so that ``undo`` restores the model exactly.

    Every change is an instance attribute set on a module (a block's ``forward``, an attention module's
    ``processor``, ...); ``undo`` puts back the previous instance attribute, or removes ours when the
    module had none (so the class's method shows through again)."""

    ops: OpBackends
    replaced: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    _undo: list[tuple[object, str, object]] = field(default_factory=list)
    _names: dict[int, str] = field(default_factory=dict)

    def name_modules(self, root: nn.Module) -> None:
        """Remember qualified names (``transformer_blocks.3.attn``) for the report."""
        self._names = {id(module): name or type(root).__name__ for name, module in root.named_modules()}

    def set_attr(self, obj: object, name: str, value: object, what: str) -> None:
        """``obj.<name> = value`` (bypassing nn.Module's registration), recorded for ``undo``."""
        self._undo.append((obj, name, obj.__dict__.get(name, _MISSING)))
        object.__setattr__(obj, name, value)
        self.replaced.append(f"{self._names.get(id(obj), type(obj).__name__)}.{name}: {what}")

    def replace_forward(self, module: nn.Module, forward: Callable, what: str) -> None:
        """Bind ``forward(module, ...)`` as ``module.forward`` (an instance attribute)."""
        self.set_attr(module, "forward", types.MethodType(forward, module), what)

    def set_processor(self, attention: nn.Module, processor: object) -> None:
        self.set_attr(attention, "processor", processor, type(processor).__name__)

    def fallback(self, what: str, why: str) -> None:
        """Something stays on diffusers' eager path; the report says what and why."""
        self.fallbacks.append(f"{what}: {why}")

    def undo(self) -> None:
        while self._undo:
            obj, name, previous = self._undo.pop()
            if previous is _MISSING:
                del obj.__dict__[name]
            else:
                object.__setattr__(obj, name, previous)


# ----------------------------------------------------------------------------------------- attention


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, S, H * Dh] -> [B, S, H, Dh] as a view (strided views of a fused QKV projection work too)."""
    return x.unflatten(-1, (num_heads, -1))


def qk_norm_kwargs(norm_q: Optional[nn.Module], norm_k: Optional[nn.Module]) -> dict:
    """``qk_norm_rope`` keyword arguments reproducing a pair of per-head norm modules.

    Accepts diffusers' ``RMSNorm``, ``torch.nn.RMSNorm`` and ``torch.nn.LayerNorm`` over the head dim (or
    None for no norm); raises ValueError on anything else, so a patcher refuses instead of diverging."""
    kinds = {_norm_kind(norm_q), _norm_kind(norm_k)}
    if len(kinds) != 1:
        raise ValueError(f"q and k norms differ ({type(norm_q).__name__} vs {type(norm_k).__name__})")
    kind = kinds.pop()
    if kind is None:
        return {"norm": None}
    eps = {_norm_eps(norm_q), _norm_eps(norm_k)}
    if len(eps) != 1:
        raise ValueError(f"q and k norms have different eps {sorted(eps)}")
    return {
        "norm": kind,
        "eps": eps.pop(),
        "q_weight": getattr(norm_q, "weight", None),
        "k_weight": getattr(norm_k, "weight", None),
        "q_bias": getattr(norm_q, "bias", None),
        "k_bias": getattr(norm_k, "bias", None),
    }


def _norm_kind(norm: Optional[nn.Module]) -> Optional[str]:
    from diffusers.models.normalization import RMSNorm

    if norm is None:
        return None
    if isinstance(norm, (RMSNorm, nn.RMSNorm)):
        return "rms"
    if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1:
        return "layer"
    raise ValueError(f"unsupported per-head norm {type(norm).__name__}")


def _norm_eps(norm: nn.Module) -> float:
    eps = norm.eps
    return torch.finfo(torch.float32).eps if eps is None else float(eps)  # nn.RMSNorm(eps=None): finfo.eps


@dataclass
class Stream:
    """One token stream of a joint attention: projections [B, S_i, H * Dh] (views are fine) and the
    per-head norms that apply to its q and k (None: no norm)."""

    query: Tensor
    key: Tensor
    value: Tensor
    norm_q: Optional[nn.Module] = None
    norm_k: Optional[nn.Module] = None


def fused_joint_attention(
    streams: Sequence[Stream],
    num_heads: int,
    ops: OpBackends,
    *,
    rope: Optional[tuple[Tensor, Tensor]] = None,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Attention over the concatenation of ``streams`` (in the given order) without materialising it.

    Each stream's q, k, v go through one ``qk_norm_rope`` launch that normalises q and k per head, rotates
    them with ``rope`` = (cos, sin) [S_total, Dh] (rows of the concatenated sequence, as FLUX builds them)
    and writes q, k, v at the stream's offset in the joint buffers. A single stream with nothing to
    normalise or rotate attends on views of its projections directly. Returns [B, S_total, H * Dh]."""
    first = streams[0]
    direct = len(streams) == 1 and rope is None and first.norm_q is None and first.norm_k is None
    if direct:
        q, k, v = (split_heads(t, num_heads) for t in (first.query, first.key, first.value))
    else:
        q, k, v = joint_buffers(streams, num_heads, ops, rope)
    return joint_attention(q, k, v, mask=mask, backend=ops.attention).flatten(-2)


def joint_buffers(
    streams: Sequence[Stream], num_heads: int, ops: OpBackends, rope: Optional[tuple[Tensor, Tensor]] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The joint q, k, v [B, S_total, H, Dh] of ``streams`` (in order): one ``qk_norm_rope`` launch per
    stream normalises and rotates its q and k and writes q, k, v at the stream's offset."""
    batch, head_dim = streams[0].query.shape[0], streams[0].query.shape[-1] // num_heads
    total = sum(s.query.shape[1] for s in streams)
    like = streams[0].query
    q, k, v = (like.new_empty(batch, total, num_heads, head_dim) for _ in range(3))
    cos, sin = rope if rope is not None else (None, None)
    offset = 0
    for s in streams:
        heads = [split_heads(t, num_heads) for t in (s.query, s.key, s.value)]
        qk_norm_rope(heads[0], heads[1], v=heads[2], **qk_norm_kwargs(s.norm_q, s.norm_k), cos=cos, sin=sin,
                     out_q=q, out_k=k, out_v=v, seq_offset=offset, backend=ops.fused)  # fmt: skip
        offset += s.query.shape[1]
    return q, k, v
