"""What every family patcher uses: validators, modulate helpers, the direct GEMM paths, and the fused
attention front-end (per-head QK norm + RoPE written straight into one joint [B, S_total, H, Dh] buffer
per q/k/v, then ``joint_attention``), each op honouring its ``OpBackends`` switch (off: diffusers' own
computation of that op).

Patchers never fuse or copy weights: they call the model's own ``nn.Linear`` modules, so LoRA layers
that peft injects before or after ``patch`` keep working, and the state dict never changes.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dit_kernels.ops import (
    gated_residual,
    gated_residual_layernorm_modulate,
    joint_attention,
    layernorm_modulate,
    qk_norm_rope,
    to_heads_first,
    to_seq_first,
)
from dit_kernels.parallel.attention import context_parallel_attention
from dit_kernels.patching import OpBackends

FP16_MAX = torch.finfo(torch.float16).max  # 65504: diffusers' clip bound
# Block arguments with the batch first, of the joint (image + text stream) blocks of SD3 and FLUX.
JOINT_BLOCK_BATCH_ARGS = frozenset({"hidden_states", "encoder_hidden_states", "temb"})


# ----------------------------------------------------------------------------------------- validation


def check_type(module: object, cls: type, name: str, family: str) -> None:
    """Exactly ``cls`` (a subclass may override what the patcher replaces), else ValueError naming it."""
    if type(module) is not cls:
        raise ValueError(
            f"{family}: {name} is {qualname(type(module))}, expected exactly {qualname(cls)}: the {family} "
            "patcher reproduces only diffusers' stock modules with their default attention processor"
        )


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def check_unwrapped(module: nn.Module, name: str, family: str) -> None:
    """A forward already set on the instance (diffusers hooks: caching, offloading; accelerate hooks) would
    be bypassed by ours, so such a module is refused rather than silently unhooked."""
    if "forward" in module.__dict__:
        raise ValueError(
            f"{family}: {name}.forward is already wrapped ({module.__dict__['forward']!r}, e.g. by a diffusers "
            "or accelerate hook); remove the hook before dit_kernels.patch, or apply it after"
        )


def check_qk_norms(attn: nn.Module, pairs: Sequence[tuple[str, str]], name: str, family: str) -> None:
    """Each (q, k) pair of per-head norm attributes of ``attn`` is one ``qk_norm_rope`` can reproduce."""
    for q, k in pairs:
        try:
            qk_norm_kwargs(getattr(attn, q), getattr(attn, k))
        except ValueError as err:
            raise ValueError(f"{family}: {name}.{q}/{k}: {err}") from None


# ----------------------------------------------------------------------------------------- norm + modulate


def modulation(ada_norm: nn.Module, temb: Tensor, chunks: int) -> tuple[Tensor, ...]:
    """``ada_norm.linear(ada_norm.silu(temb)).chunk(chunks, dim=1)``: [B, D] views, in diffusers' order
    (AdaLayerNormZero / AdaLayerNormZeroSingle without their own embedding)."""
    return ada_norm.linear(ada_norm.silu(temb)).chunk(chunks, dim=1)


def layernorm_kwargs(norm: nn.LayerNorm) -> dict:
    """The LayerNorm's affine parameters (None without) and eps, as fused-op keywords."""
    return {"weight": norm.weight, "bias": norm.bias, "eps": norm.eps}


def modulate(x: Tensor, norm: nn.LayerNorm, shift: Optional[Tensor], scale: Optional[Tensor],
             ops: OpBackends) -> Tensor:  # fmt: skip
    """``norm(x) * (1 + scale) + shift``: x [B, S, D], shift/scale [B, D] / [B, 1, D] (None: left out); one
    layernorm_modulate launch, statistics in fp32."""
    return layernorm_modulate(x, shift, scale, **layernorm_kwargs(norm), backend=ops.norm)


def gated_feed_forward(h: Tensor, attn: Tensor, mod: Sequence[Tensor], norm: nn.LayerNorm, ff: nn.Module,
                       ops: OpBackends) -> Tensor:  # fmt: skip
    """An adaLN-Zero block's tail on one stream, ``mod = (gate_msa, shift_mlp, scale_mlp, gate_mlp)``:
    ``h += gate_msa * attn; h += gate_mlp * ff(norm(h) * (1 + scale_mlp) + shift_mlp)``. [B, S, D];
    two launches (gated_residual_layernorm_modulate, gated_residual) around the model's own ``ff``."""
    gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
    h, normed = gated_residual_layernorm_modulate(h, attn, gate_msa, shift_mlp, scale_mlp, **layernorm_kwargs(norm),
                                                  backend=ops.norm)  # fmt: skip
    return gated_residual(h, ff(normed), gate_mlp, backend=ops.norm)


def clip_fp16(x: Tensor) -> Tensor:
    """What diffusers does after some residuals in fp16: ``x.clip(-65504, 65504)`` (an overflow becomes
    the largest finite value, not inf). In place on our own fresh output; other dtypes pass unchanged."""
    return x.clamp_(-FP16_MAX, FP16_MAX) if x.dtype == torch.float16 else x


# ----------------------------------------------------------------------------------------- per-call memo


class TensorMemo:
    """``fn(x)`` computed once for a tensor every block receives (the timestep, ``temb``): the last result
    is returned again while that very tensor, unmodified (same ``_version``), comes back with the same
    ``key``. One entry, read and replaced whole, so threads sharing a model cannot mix two. Off under
    torch.compile (the compiler dedupes itself) and CUDA-graph capture (every block then records its own)."""

    def __init__(self):
        self.entry: Optional[tuple] = None  # (x, x._version, key, fn(x))

    def __call__(self, fn: Callable[[Tensor], Tensor], x: Tensor, key: tuple = ()) -> Tensor:
        if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return fn(x)
        entry = self.entry
        if entry is None or entry[0] is not x or entry[1:3] != (x._version, key):
            entry = self.entry = (x, x._version, key, fn(x))
        return entry[3]


# ----------------------------------------------------------------------------------------- direct GEMM paths
# Where a module is a plain, unhooked nn.Linear at eager inference, a patcher may read its weight and bias in
# place (never copied) to fuse around the GEMM; a peft LoRA layer or a hooked module is called as a module.


def feed_forward(ff: nn.Module, x: Tensor, ops: OpBackends) -> Tensor:
    """``ff(x)`` for x [B, S, D]; when ``gelu_fits_epilogue``, ``gelu_tanh(proj(x))`` is one
    ``torch._addmm_activation`` GEMM (cuBLASLt's GELU_BIAS epilogue: the [B, S, 4D] activation is written
    once and never re-read by a GELU kernel), then ``ff``'s own Dropout and output Linear."""
    if not gelu_fits_epilogue(ff, x, ops):
        return ff(x)
    hidden = linear_gelu_tanh(ff.net[0].proj, x)
    for module in ff.net[1:]:
        hidden = module(hidden)
    return hidden


def linear_gelu_tanh(proj: nn.Linear, x: Tensor) -> Tensor:
    """``gelu_tanh(proj(x))`` [..., Dout] as one ``torch._addmm_activation`` GEMM (on CUDA cuBLASLt's GELU_BIAS
    epilogue: the activation is written once, never re-read by a GELU kernel). ``proj``: a plain biased Linear."""
    hidden = torch._addmm_activation(proj.bias, x.flatten(0, -2), proj.weight.t(), use_gelu=True)
    return hidden.unflatten(0, x.shape[:-1])


def block_feed_forward(block: nn.Module, ff: nn.Module, ops: OpBackends) -> Callable[[Tensor], Tensor]:
    """``ff`` as a diffusers block with ``set_chunk_feed_forward`` calls it: diffusers' own
    ``_chunked_feed_forward`` once a chunk size is set, else whole through ``feed_forward``."""
    if block._chunk_size is None:
        return functools.partial(feed_forward, ff, ops=ops)
    from diffusers.models.attention import _chunked_feed_forward

    return functools.partial(_chunked_feed_forward, ff, chunk_dim=block._chunk_dim, chunk_size=block._chunk_size)


def gelu_fits_epilogue(ff: nn.Module, x: Tensor, ops: OpBackends) -> bool:
    """FeedForward(activation_fn="gelu-approximate") whose ``net[0].proj`` is a plain biased nn.Linear, nothing
    hooked, eager inference, and ``ops.gelu_epilogue`` (None: on CUDA, where ``_addmm_activation``'s GELU is
    the tanh approximation; on CPU it is the exact erf GELU, so CPU calls the module)."""
    if not gelu_epilogue_on(x, ops):  # first: the answer on CPU, at no module inspection per call
        return False
    from diffusers.models.activations import GELU
    from diffusers.models.attention import FeedForward

    act = ff.net[0] if type(ff) is FeedForward else None
    return (
        type(act) is GELU
        and act.approximate == "tanh"
        and is_plain_linear(act.proj)
        and act.proj.bias is not None
        and not is_hooked(ff)
        and not is_hooked(act)
    )


def gelu_epilogue_on(x: Tensor, ops: OpBackends) -> bool:
    """Whether a tanh GELU may run in its GEMM's epilogue for input ``x``: ``ops.gelu_epilogue`` (None: on
    CUDA tensors, where ``_addmm_activation``'s GELU is the tanh one) and eager inference."""
    return (x.device.type == "cuda" if ops.gelu_epilogue is None else ops.gelu_epilogue) and plain_inference(x)


def plain_inference(x: Tensor) -> bool:
    """Eager inference: the direct GEMM paths' condition. Under autograd (out= GEMMs record none), the
    compiler (it plans its own buffers and fusions) or autocast (which casts module calls only) the modules
    are called instead."""
    device = x.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling() or autocast)


def is_plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and not is_hooked(module)


def linear_into(linear: nn.Linear, x: Tensor, out: Tensor) -> Tensor:
    """``out[...] = linear(x)`` for x [B, S, Din] and out [B, S, Dout] whose samples are each a contiguous
    block of rows (slices of joint buffers), without a copy: one GEMM writing ``out`` when both are
    contiguous (or B is 1), else one GEMM per sample. The bias goes in cuBLASLt's epilogue (``addmm`` of a
    1-D bias into a contiguous 2-D output), never pre-copied into the output as ``baddbmm`` does.
    ``linear``: a plain nn.Linear (its weight read in place)."""
    weight = linear.weight.t()
    whole = x.is_contiguous() and out.is_contiguous()
    for rows, dest in [(x.flatten(0, 1), out.flatten(0, 1))] if whole else zip(x, out):
        if linear.bias is None:
            torch.mm(rows, weight, out=dest)
        else:
            torch.addmm(linear.bias, rows, weight, out=dest)
    return out


def project(linear: nn.Module, x: Tensor) -> Tensor:
    """``linear(x)`` for x [B, S, Din] whose samples are contiguous row blocks of a larger buffer (a stream's
    rows of a joint attention output): a plain Linear at eager inference runs one GEMM per sample on the
    rows in place (``linear_into``) where ``F.linear`` would first copy ``x`` contiguous; else the module."""
    if x.is_contiguous() or not is_plain_linear(linear) or not plain_inference(x):
        return linear(x)
    return linear_into(linear, x, x.new_empty(*x.shape[:-1], linear.out_features))


def is_hooked(module: nn.Module) -> bool:
    """A forward hook, pre-hook or instance forward (diffusers/accelerate hooks) would be bypassed by
    reading the module's parameters instead of calling it."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


# ----------------------------------------------------------------------------------------- attention


def call_attention(attn: nn.Module, processor_cls: type[WrappingProcessor], **kwargs) -> Tensor:
    """``attn(**kwargs)``. When ``attn``'s processor is our fused ``processor_cls``, nothing hooks ``attn``
    and the processor takes every keyword, the processor is called directly: diffusers' attention forwards
    (``Attention``, ``FluxAttention``) only drop the keywords ``inspect.signature(processor.__call__)``
    lacks (13-21 us a call on CPU) and call the processor with the rest, so here they would drop none."""
    processor = attn.processor
    if type(processor) is processor_cls and not is_hooked(attn) and kwargs.keys() <= processor_cls.keywords:
        return processor(attn, **kwargs)
    return attn(**kwargs)


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
    parallel_config=None,
) -> Tensor:
    """Attention over the concatenation of ``streams`` (in the given order) without materialising it
    (context-parallel with ``parallel_config``, see ``attend``).

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
    return attend(q, k, v, ops, mask, parallel_config).flatten(-2)


def attend(q: Tensor, k: Tensor, v: Tensor, ops: OpBackends, mask: Optional[Tensor] = None,
           parallel_config=None) -> Tensor:  # fmt: skip
    """Softmax attention (scale 1/sqrt(Dh)) over [B, S, H, Dh]: ``joint_attention``, or with the attention op
    off diffusers' eager ``F.scaled_dot_product_attention`` on [B, H, S, Dh] views, a key-padding ``mask``
    ([B, Skv] / [B, 1, Skv], bool or additive) broadcast as [B, 1, 1, Skv] as diffusers' processors do.
    ``parallel_config`` (diffusers' ``ParallelConfig``; the sequence of q, k and v sharded over its ranks):
    the same attention over the whole sequence, ``joint_attention`` (SDPA with the op off) as the local op
    of diffusers' Ulysses / Ring attention."""
    if parallel_config is not None:
        backend = ops.attention if ops.on("attention") else "torch"
        return context_parallel_attention(q, k, v, parallel_config, mask=mask, backend=backend)
    if ops.on("attention"):
        return joint_attention(q, k, v, mask=mask, backend=ops.attention)
    if mask is not None:
        mask = mask.reshape(mask.shape[0], 1, 1, mask.shape[-1])
        mask = mask if mask.dtype in (torch.bool, q.dtype) else mask.to(q.dtype)
    out = F.scaled_dot_product_attention(to_heads_first(q), to_heads_first(k), to_heads_first(v), attn_mask=mask)
    return to_seq_first(out)


def joint_buffers(
    streams: Sequence[Stream], num_heads: int, ops: OpBackends, rope: Optional[tuple[Tensor, Tensor]] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The joint q, k, v [B, S_total, H, Dh] of ``streams`` (in order): one ``qk_norm_rope`` launch per
    stream normalises and rotates its q and k and writes q, k and v at the stream's offset (rope op off:
    diffusers' norm modules and ``apply_rotary_emb`` on the stream's table rows, copied in). A single
    stream's v is its projection itself (a [B, S, H, Dh] view, of a fused QKV projection too): not copied."""
    batch, head_dim = streams[0].query.shape[0], streams[0].query.shape[-1] // num_heads
    total = sum(s.query.shape[1] for s in streams)
    like = streams[0].query
    q, k = (like.new_empty(batch, total, num_heads, head_dim) for _ in range(2))
    single = len(streams) == 1
    v = split_heads(streams[0].value, num_heads) if single else like.new_empty(batch, total, num_heads, head_dim)
    cos, sin = rope if rope is not None else (None, None)
    offset = 0
    for s in streams:
        heads = [split_heads(t, num_heads) for t in (s.query, s.key, s.value)]
        rows = slice(offset, offset + s.query.shape[1])
        values = {} if single else {"v": heads[2], "out_v": v}
        if ops.on("rope"):
            qk_norm_rope(heads[0], heads[1], **values, **qk_norm_kwargs(s.norm_q, s.norm_k), cos=cos, sin=sin,
                         out_q=q, out_k=k, seq_offset=offset, backend=ops.rope)  # fmt: skip
        else:
            table = None if rope is None else tuple(t if t.shape[0] == 1 else t[rows] for t in rope)
            q[:, rows], k[:, rows] = eager_qk_norm_rope(heads[0], heads[1], s.norm_q, s.norm_k, table)
            if not single:
                v[:, rows] = heads[2]
        offset += s.query.shape[1]
    return q, k, v


def eager_qk_norm_rope(q: Tensor, k: Tensor, norm_q: Optional[nn.Module], norm_k: Optional[nn.Module],
                       rope: Optional[tuple[Tensor, Tensor]], rope_k: bool = True) -> tuple[Tensor, Tensor]:  # fmt: skip
    """What diffusers' processors do, on [B, S, H, Dh]: the per-head norm modules, then ``apply_rotary_emb``
    (interleaved pairs) with ``rope`` (cos, sin) [S, Dh] (one row: broadcast) on q, and on k if ``rope_k``."""
    from diffusers.models.embeddings import apply_rotary_emb

    q = q if norm_q is None else norm_q(q)
    k = k if norm_k is None else norm_k(k)
    if rope is not None:
        q = apply_rotary_emb(q, rope, sequence_dim=1)
        k = apply_rotary_emb(k, rope, sequence_dim=1) if rope_k else k
    return q, k


def diffusers_dispatch_asked(attention_backend, mask: Optional[Tensor]) -> bool:
    """Whether a processor of the ``dispatch_attention_fn`` stack (FLUX, Wan) must hand its attention to
    diffusers: an attention backend set on it (``set_attention_backend``), diffusers' active backend not the
    default "native" (the ``attention_backend`` context manager, ``DIFFUSERS_ATTN_BACKEND``), or a mask."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    active, _ = _AttentionBackendRegistry.get_active_backend()
    return attention_backend is not None or mask is not None or active != AttentionBackendName.NATIVE


def forwarded_attribute(name: str) -> property:
    """A processor attribute kept on the diffusers processor it wraps (``self.original``; None where that
    has none): a setting made before ``patch`` is honoured, one made while patched survives ``unpatch``
    (``_attention_backend``, and ``_parallel_config``, which ``dit_kernels.enable_parallelism`` sets)."""
    return property(lambda self: getattr(self.original, name, None),
                    lambda self, value: setattr(self.original, name, value))  # fmt: skip


class WrappingProcessor:
    """Base of the fused attention processors. Each replaces a diffusers processor, kept as ``original``:
    what is not fused falls back to it, and ``_attention_backend`` / ``_parallel_config`` live on it
    (``forwarded_attribute``). Built with no arguments, as diffusers rebuilds processors
    (``type(processor)()``, e.g. when it loads an IP-adapter): a fresh ``new_original()``, each op's default
    backend."""

    _attention_backend = forwarded_attribute("_attention_backend")
    _parallel_config = forwarded_attribute("_parallel_config")
    keywords: frozenset[str] = frozenset()  # what ``__call__`` takes (``call_attention``), set per subclass

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.keywords = frozenset(inspect.signature(cls.__call__).parameters)

    def __init__(self, original: Optional[object] = None, ops: OpBackends = OpBackends()):
        self.original = self.new_original() if original is None else original
        self.ops = ops

    @staticmethod
    def new_original() -> object:
        raise NotImplementedError


class FusedAttnProcessor(WrappingProcessor):
    """diffusers' ``AttnProcessor2_0`` / ``HunyuanAttnProcessor2_0`` on a legacy ``Attention`` (DiT, PixArt,
    HunyuanDiT; self- or cross-attention), with the per-head q/k norm and RoPE in one ``qk_norm_rope`` launch.

    ``attn(hidden_states [B, Sq, D], encoder_hidden_states [B, Skv, C] | None, attention_mask,
    image_rotary_emb (cos, sin) [Sq, Dh] | None)``: q = to_q(h), k/v = to_k/to_v(context, or h);
    ``norm_q``/``norm_k`` over Dh; RoPE (interleaved pairs) on q, and on k only for self-attention, as
    HunyuanDiT's processor does; ``joint_attention`` with diffusers' scale 1/sqrt(Dh); ``to_out``.
    Nothing to normalise or rotate: attention runs on views of the projections (no copy). The rope and
    attention ops each run diffusers' own computation when ``ops`` switches them off.

    ``attention_mask``: the key-padding masks these models pass ([B, Skv] / [B, 1, Skv], bool or additive,
    as PixArt builds from ``encoder_attention_mask``). Any other mask (per-query rows) goes to the
    original processor, logged once: correct, not fused. ``validate_legacy_attention`` checks the module
    options this processor leaves out (spatial/group norm, residual connection, output rescale) are off.
    Under context parallelism (``_parallel_config``, set by ``dit_kernels.enable_parallelism`` on this
    processor or on the one it wraps) self-attention runs over every rank's shard of the sequence
    (``attend``); a cross-attention to a context every rank holds whole runs locally.
    Built with no arguments: diffusers' ``HunyuanAttnProcessor2_0`` (which covers ``AttnProcessor2_0``) as
    the original."""

    @staticmethod
    def new_original() -> object:
        from diffusers.models.attention_processor import HunyuanAttnProcessor2_0

        return HunyuanAttnProcessor2_0()

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        temb: Optional[Tensor] = None,
        image_rotary_emb: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Tensor:
        # context parallelism: self-attention runs over every rank's shard; a cross-attention's context is
        # whole on every rank, so it attends locally
        parallel = self._parallel_config if encoder_hidden_states is None else None
        if attention_mask is not None and not _is_key_padding(attention_mask, hidden_states.shape[0]):
            if parallel is not None:
                raise ValueError(f"attention mask of shape {tuple(attention_mask.shape)} (not a key-padding mask) "
                                 "in a self-attention: context parallelism cannot run it")  # fmt: skip
            _log_once(f"{type(self).__name__}: attention mask of shape {tuple(attention_mask.shape)} is not a "
                      "key-padding mask; running diffusers' processor for it")  # fmt: skip
            kwargs = {"image_rotary_emb": image_rotary_emb} if image_rotary_emb is not None else {}
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = (split_heads(proj(x), attn.heads) for proj, x in
                   ((attn.to_q, hidden_states), (attn.to_k, context), (attn.to_v, context)))  # fmt: skip
        rope_k = not attn.is_cross_attention
        if not self.ops.on("rope"):
            q, k = eager_qk_norm_rope(q, k, attn.norm_q, attn.norm_k, image_rotary_emb, rope_k)
        elif attn.norm_q is not None or attn.norm_k is not None or image_rotary_emb is not None:
            cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
            q, k = qk_norm_rope(q, k, **qk_norm_kwargs(attn.norm_q, attn.norm_k), cos=cos, sin=sin, rope_k=rope_k,
                                backend=self.ops.rope)  # fmt: skip
        out = attend(q, k, v, self.ops, attention_mask, parallel).flatten(-2)
        return attn.to_out[1](attn.to_out[0](out))


def validate_legacy_attention(attn: nn.Module, processor_cls: type, name: str, family: str) -> None:
    """``attn`` is diffusers' stock ``Attention`` with ``processor_cls`` and no option FusedAttnProcessor
    leaves out; its q/k norms are ones qk_norm_rope reproduces."""
    from diffusers.models.attention_processor import Attention

    check_type(attn, Attention, name, family)
    check_type(attn.processor, processor_cls, f"{name}.processor", family)
    options = {"spatial_norm": attn.spatial_norm is not None, "group_norm": attn.group_norm is not None,
               "norm_cross": bool(attn.norm_cross), "residual_connection": attn.residual_connection,
               "rescale_output_factor != 1": attn.rescale_output_factor != 1.0}  # fmt: skip
    unsupported = [option for option, on in options.items() if on]
    if unsupported:
        raise ValueError(f"{family}: {name} uses {', '.join(unsupported)}, which the fused processor does not")
    check_qk_norms(attn, [("norm_q", "norm_k")], name, family)


def _is_key_padding(mask: Tensor, batch: int) -> bool:
    """[B, Skv], [B, 1, Skv] or [B, 1, 1, Skv]: one row of key weights per sample."""
    return mask.shape[0] == batch and all(size == 1 for size in mask.shape[1:-1])


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logging.getLogger("dit_kernels").warning(message)
