"""SD3 / SD3.5 patcher: ``SD3Transformer2DModel``'s ``JointTransformerBlock`` on fused ops.

Per block, on the image stream ``h`` [B, S, D] and the text stream ``c`` [B, T, D], with
``img = norm1.linear(silu(temb)).chunk(6)`` (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp;
9 chunks with SD3.5's dual attention: then shift_msa2, scale_msa2, gate_msa2) and ``txt`` likewise from
``norm1_context``::

    x, x_c  = layernorm_modulate(h, shift_msa, scale_msa), same on c            # norm1, norm1_context
    a, a_c  = attn(x, x_c)                                                     # SD3FusedAttnProcessor
    [dual:  x2 = layernorm_modulate(h, shift_msa2, scale_msa2)                 # from the block's *input*
            h  = gated_residual(h, a, gate_msa); a, gate_msa = attn2(x2), gate_msa2]
    h, y    = gated_residual_layernorm_modulate(h, a, gate_msa, shift_mlp, scale_mlp)    # + norm2
    h       = gated_residual(h, ff(y), gate_mlp)
    c       = the same tail on the text stream (norm2_context, ff_context)

The last block (``context_pre_only``): ``norm1_context`` is AdaLayerNormContinuous, ``scale, shift =
linear(silu(temb)).chunk(2)`` (that order), the text stream only feeds the attention's keys and values
and the block returns ``(None, h)``. diffusers clips nothing in these blocks (no fp16 clip), and runs
``ff`` in chunks after ``enable_forward_chunking``: so does the patched block (same ``_chunked_feed_forward``).

``silu(temb)``: every AdaLN of every block applies its own SiLU to the same ``temb``. The patched
``time_text_embed`` computes it once per call (a ``TensorMemo``) and each block reuses it when handed that
very tensor; eager per block: 2 SiLU launches, patched: none.

Attention (``JointAttnProcessor2_0``: concatenation order **[image, text]**, no RoPE, no mask: it ignores
``attention_mask``): each stream's q/k/v land in joint [B, S + T, H, Dh] buffers without ``torch.cat``:
with per-head q/k norms (SD3.5's RMSNorm) through one ``qk_norm_rope`` launch per stream; without (SD3)
the projections' GEMMs write straight into the buffers when they are plain ``nn.Linear`` (no launch at
all besides the GEMMs), else one ``qk_norm_rope`` copy launch per stream. SD3.5's ``attn2`` (image
self-attention) attends on views of its projections when it has no norm.

FeedForward (tanh GELU): on CUDA, ``proj`` + GELU run as one ``torch._addmm_activation`` GEMM (cuBLASLt's
GELU_BIAS epilogue) when ``proj`` is a plain unhooked ``nn.Linear`` at inference; elsewhere the module runs.

Every Linear, FeedForward and Dropout stays the model's own module, called as such except in the two
direct paths above, which read a plain unhooked ``nn.Linear``'s weight and bias in place (never copied);
peft LoRA keeps working: a LoRA layer is not a plain ``nn.Linear``, so it is called as a module.
``validate`` refuses anything else (a custom, IP-adapter or fused-QKV processor, another norm type, a
forward already wrapped by a hook) before anything changes.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.attention_processor import Attention, FusedJointAttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX
from torch import Tensor, nn

from dit_kernels.models.family import Family, Shape
from dit_kernels.models.shared import (
    JOINT_BLOCK_BATCH_ARGS,
    Stream,
    TensorMemo,
    attend,
    block_feed_forward,
    check_qk_norms,
    check_type,
    check_unwrapped,
    forwarded_attribute,
    fused_joint_attention,
    gated_feed_forward,
    is_plain_linear,
    joint_buffers,
    linear_into,
    modulate,
    plain_inference,
    project,
)
from dit_kernels.ops import gated_residual
from dit_kernels.parallel.plan import gather, split_output
from dit_kernels.patching import BlockLayout, OpBackends, Patcher

NAME = "sd3"

_IMAGE = ("to_q", "to_k", "to_v", "norm_q", "norm_k")
_TEXT = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")


# ----------------------------------------------------------------------------------------- validate


def validate(transformer: SD3Transformer2DModel) -> None:
    """Raise ValueError naming the first module or config value the fused path would not reproduce."""
    _check_unwrapped(transformer.time_text_embed, "time_text_embed")
    _check_type(transformer.time_text_embed, CombinedTimestepTextProjEmbeddings, "time_text_embed")
    for i, block in enumerate(transformer.transformer_blocks):
        _validate_block(block, f"transformer_blocks.{i}")


def _validate_block(block: nn.Module, name: str) -> None:
    _check_type(block, JointTransformerBlock, name)
    _check_unwrapped(block, name)
    _check_ada_norm(block.norm1, SD35AdaLayerNormZeroX if block.use_dual_attention else AdaLayerNormZero,
                    f"{name}.norm1")  # fmt: skip
    context_norm = AdaLayerNormContinuous if block.context_pre_only else AdaLayerNormZero
    _check_ada_norm(block.norm1_context, context_norm, f"{name}.norm1_context")
    for norm in ("norm2",) + ("norm2_context",) * (not block.context_pre_only):
        _check_type(getattr(block, norm), nn.LayerNorm, f"{name}.{norm}")
    _validate_attention(block.attn, f"{name}.attn", joint=True, context_pre_only=block.context_pre_only)
    if block.use_dual_attention:
        _validate_attention(block.attn2, f"{name}.attn2", joint=False, context_pre_only=None)


def _check_ada_norm(norm: nn.Module, cls: type, name: str) -> None:
    """The AdaLN ``cls`` with a plain LayerNorm and SiLU, conditioned on ``temb`` (no embedding of its own)."""
    _check_type(norm, cls, name)
    _check_type(norm.norm, nn.LayerNorm, f"{name}.norm")
    _check_type(norm.silu, nn.SiLU, f"{name}.silu")
    if getattr(norm, "emb", None) is not None:
        raise ValueError(f"sd3: {name} embeds its own timestep/class (AdaLayerNormZero.emb); not SD3's")


def _validate_attention(attn: nn.Module, name: str, joint: bool, context_pre_only: Optional[bool]) -> None:
    """diffusers' Attention with JointAttnProcessor2_0: text projections iff ``joint``, and a text output
    projection iff the block is not ``context_pre_only``; per-head q/k norms qk_norm_rope reproduces."""
    _check_type(attn, Attention, name)
    if type(attn.processor) is FusedJointAttnProcessor2_0:
        raise ValueError(
            f"sd3: {name} uses fused QKV projections (FusedJointAttnProcessor2_0 after fuse_qkv_projections()), "
            "which the sd3 patcher does not reproduce; call transformer.unfuse_qkv_projections() before patch"
        )
    _check_type(attn.processor, JointAttnProcessor2_0, f"{name}.processor")
    if (attn.added_kv_proj_dim is not None) != joint or attn.context_pre_only != context_pre_only:
        raise ValueError(
            f"sd3: {name} has added_kv_proj_dim={attn.added_kv_proj_dim}, context_pre_only={attn.context_pre_only}; "
            f"expected {'text projections' if joint else 'none'} and context_pre_only={context_pre_only} "
            "as JointTransformerBlock builds it"
        )
    check_qk_norms(attn, [("norm_q", "norm_k")] + [("norm_added_q", "norm_added_k")] * joint, name, NAME)


_check_type = functools.partial(check_type, family=NAME)


_check_unwrapped = functools.partial(check_unwrapped, family=NAME)


# ----------------------------------------------------------------------------------------- apply


def apply(transformer: SD3Transformer2DModel, patcher: Patcher) -> None:
    """Swap time_text_embed's forward (for the fused blocks), every block's forward and every attention
    processor."""
    silu = TensorMemo()
    if patcher.ops.on("norm"):
        patcher.replace_forward(transformer.time_text_embed, _time_text_embed_forward(silu),
                                "silu(temb) once per call")  # fmt: skip
    forward = _block_forward(patcher.ops, silu)
    for block in transformer.transformer_blocks:
        patcher.replace_block(block, forward, _fused_ops(block), (block.attn, block.attn2), SD3FusedAttnProcessor)


def _fused_ops(block: JointTransformerBlock) -> str:
    """The block's fused launches, for the report."""
    dual, text_tail = int(block.use_dual_attention), int(not block.context_pre_only)
    counts = {"layernorm_modulate": 2 + dual, "gated_residual_layernorm_modulate": 1 + text_tail,
              "gated_residual": 1 + text_tail + dual}  # fmt: skip
    return ", ".join(op if n == 1 else f"{op} x{n}" for op, n in counts.items())


def _time_text_embed_forward(silu: TensorMemo):
    """CombinedTimestepTextProjEmbeddings.forward, computing ``silu(temb)`` for the blocks (``silu``)."""

    def forward(embed, timestep, pooled_projection):
        temb = CombinedTimestepTextProjEmbeddings.forward(embed, timestep, pooled_projection)
        silu(F.silu, temb)
        return temb

    return forward


def _block_forward(ops: OpBackends, silu: TensorMemo):
    """JointTransformerBlock.forward on fused ops (the math in the module docstring)."""

    def forward(block, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
        joint_attention_kwargs = joint_attention_kwargs or {}
        conditioning = silu(F.silu, temb)
        img = block.norm1.linear(conditioning).chunk(9 if block.use_dual_attention else 6, dim=1)
        txt = _context_modulation(block, conditioning, encoder_hidden_states.dtype)
        attn_img, attn_txt = block.attn(
            hidden_states=modulate(hidden_states, block.norm1.norm, img[0], img[1], ops),
            encoder_hidden_states=modulate(encoder_hidden_states, block.norm1_context.norm, txt[0], txt[1], ops),
            **joint_attention_kwargs,
        )
        residual, tail = hidden_states, img[2:6]
        if block.use_dual_attention:  # attn2 normalises the block's input, its residual follows attn's
            normed2 = modulate(hidden_states, block.norm1.norm, img[6], img[7], ops)
            residual = gated_residual(hidden_states, attn_img, img[2], backend=ops.norm)
            attn_img, tail = block.attn2(hidden_states=normed2, **joint_attention_kwargs), (img[8], *img[3:6])
        ff = block_feed_forward(block, block.ff, ops)
        hidden_states = gated_feed_forward(residual, attn_img, tail, block.norm2, ff, ops)
        if block.context_pre_only:
            return None, hidden_states
        encoder_hidden_states = gated_feed_forward(encoder_hidden_states, attn_txt, txt[2:], block.norm2_context,
                                                   block_feed_forward(block, block.ff_context, ops), ops)  # fmt: skip
        return encoder_hidden_states, hidden_states

    return forward


def _context_modulation(block: JointTransformerBlock, conditioning: Tensor, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """``norm1_context``'s modulation chunks [B, D] in AdaLayerNormZero's order (shift_msa, scale_msa, gate_msa,
    shift_mlp, scale_mlp, gate_mlp), or, in the context_pre_only block, AdaLayerNormContinuous's (shift,
    scale): its Linear gives (scale, shift), from silu(temb) cast to the text stream's ``dtype``."""
    norm = block.norm1_context
    if block.context_pre_only:
        scale, shift = norm.linear(conditioning.to(dtype)).chunk(2, dim=1)
        return shift, scale
    return norm.linear(conditioning).chunk(6, dim=1)


# ----------------------------------------------------------------------------------------- attention


class SD3FusedAttnProcessor:
    """JointAttnProcessor2_0 with the streams' q/k norms and their concatenation fused (module docstring).

    ``attn(hidden_states [B, S, D], encoder_hidden_states [B, T, D] | None)``: joint [B, S + T, H, Dh]
    q/k/v with the image stream (``to_*``, ``norm_*``) at rows 0..S-1 and the text stream (``add_*_proj``,
    ``norm_added_*``) after it; ``joint_attention`` (scale 1/sqrt(Dh)); ``to_out`` on the image rows and
    ``to_add_out`` on the text rows (or the text rows as they are in a context_pre_only block, as diffusers
    returns them). Without ``encoder_hidden_states`` (SD3.5's attn2): self-attention of the image stream.
    ``attention_mask``, ``*args`` and ``**kwargs`` are accepted and ignored, as JointAttnProcessor2_0 does.
    Under context parallelism (``_parallel_config``) both streams are sharded along the sequence and the
    attention runs over every rank's shards (``attend``).
    Constructible with no arguments (diffusers' ``type(processor)()``): each op's default backend."""

    _parallel_config = forwarded_attribute("_parallel_config")

    def __init__(self, original: Optional[JointAttnProcessor2_0] = None, ops: OpBackends = OpBackends()):
        self.original = JointAttnProcessor2_0() if original is None else original
        self.ops = ops

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor = None,
        attention_mask: Optional[Tensor] = None,
        *args,
        **kwargs,
    ):
        if encoder_hidden_states is None:
            out = fused_joint_attention([_stream(attn, hidden_states, _IMAGE)], attn.heads, self.ops,
                                        parallel_config=self._parallel_config)  # fmt: skip
            return attn.to_out[1](attn.to_out[0](out))
        inputs = ((hidden_states, _IMAGE), (encoder_hidden_states, _TEXT))
        if _projects_into_buffers(attn, hidden_states):
            q, k, v = _projected_joint_buffers(attn, inputs)
        else:
            q, k, v = joint_buffers([_stream(attn, x, names) for x, names in inputs], attn.heads, self.ops)
        out = attend(q, k, v, self.ops, parallel_config=self._parallel_config).flatten(2)
        img, txt = out.split_with_sizes([hidden_states.shape[1], encoder_hidden_states.shape[1]], dim=1)
        img = attn.to_out[1](project(attn.to_out[0], img))
        return img, txt if attn.context_pre_only else project(attn.to_add_out, txt)


def _stream(attn: Attention, x: Tensor, names: tuple[str, ...]) -> Stream:
    """One stream's projections of ``x`` and its q/k norms (attribute ``names``: q, k, v, norm_q, norm_k)."""
    return Stream(*(getattr(attn, n)(x) for n in names[:3]), *(getattr(attn, n) for n in names[3:]))


def _projects_into_buffers(attn: Attention, x: Tensor) -> bool:
    """Whether the six projections can write straight into the joint buffers: no q/k norm to apply, plain
    unhooked ``nn.Linear`` modules (not a peft LoRA layer), eager inference."""
    norms = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
    linears = [getattr(attn, n) for names in (_IMAGE, _TEXT) for n in names[:3]]
    return (
        all(getattr(attn, n) is None for n in norms)
        and all(is_plain_linear(linear) for linear in linears)
        and plain_inference(x)
    )


def _projected_joint_buffers(attn: Attention, inputs) -> tuple[Tensor, Tensor, Tensor]:
    """Joint q, k, v [B, S + T, H, Dh] filled by the streams' projection GEMMs themselves (``linear_into``: no
    copy, the bias in the GEMM's epilogue, one GEMM per sample when B > 1)."""
    first = inputs[0][0]
    batch, total = first.shape[0], sum(x.shape[1] for x, _ in inputs)
    weight = attn.to_q.weight
    buffers = [first.new_empty(batch, total, weight.shape[0]) for _ in range(3)]
    offset = 0
    for x, names in inputs:
        rows = slice(offset, offset + x.shape[1])
        for buffer, name in zip(buffers, names[:3]):
            linear_into(getattr(attn, name), x, buffer[:, rows])
        offset += x.shape[1]
    return tuple(buffer.unflatten(-1, (attn.heads, -1)) for buffer in buffers)


# ----------------------------------------------------------------------------------------- examples


def inputs(config, shape: Shape, randn: Callable, dtype: torch.dtype) -> dict:
    """StableDiffusion3Pipeline's transformer call: latents [B, C, H, W], T5+CLIP text, pooled CLIP."""
    b = shape.batch
    return {
        "hidden_states": randn(b, config.in_channels, shape.height, shape.width),
        "encoder_hidden_states": randn(b, shape.text_len, config.joint_attention_dim),
        "pooled_projections": randn(b, config.pooled_projection_dim),
        "timestep": torch.arange(b) * 37 % 1000,
    }


_REAL = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
             pos_embed_max_size=192)  # SD3-medium  # fmt: skip
CONFIGS = {
    "real": _REAL,
    "small": _REAL | dict(num_layers=2),  # the second block is the context_pre_only one
    "tiny": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24,
                 pos_embed_max_size=16),  # fmt: skip
}

FAMILY = Family(
    name=NAME,
    classes=(SD3Transformer2DModel,),
    validate=validate,
    apply=apply,
    blocks=BlockLayout(("transformer_blocks",), joint=True, batch_args=JOINT_BLOCK_BATCH_ARGS,
                       bypass_args=("block_controlnet_hidden_states", "skip_layers")),  # fmt: skip
    configs=CONFIGS,
    inputs=inputs,
    text_len=lambda config: 333,  # 77 CLIP + 256 T5
    traffic_shape=Shape(1, 128, 128, 333),  # 1024 px
    traffic_depth={"num_layers": 3},  # the last block is context_pre_only
    # both streams split along the sequence as they are embedded (the joint attention sees each rank's image and
    # text shards: the text length must divide too, e.g. the pipeline's max_sequence_length=257 with its 77
    # CLIP tokens for 2 or 4 ranks), the image tokens gathered after proj_out; the last block returns no text
    parallel_plan={"pos_embed": {0: split_output(1, dims=3)}, "context_embedder": {0: split_output(1, dims=3)},
                   "proj_out": gather(1, dims=3)},  # fmt: skip
)
