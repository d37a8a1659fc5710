"""Wan 2.1 / 2.2 patcher: ``WanTransformer3DModel`` (T2V, I2V with image context, TI2V with per-token
timesteps, the A14B pair ``transformer`` + ``transformer_2``), diffusers 0.42.

Latents [B, C, F, H, W], patch (1, 2, 2): h [B, S, D] with S = F * H/2 * W/2 video tokens. Per block
(``WanTransformerBlock``), with ``shift, scale, gate, c_shift, c_scale, c_gate = (scale_shift_table + temb
in fp32).chunk(6)`` ([B, 1, D] views; Wan 2.2 TI2V: [B, S, D], one timestep per token), all fp32 inside each
launch, one rounding per output, 4 fused launches per block::

    x     = layernorm_modulate(h, shift, scale)                           # norm1 (FP32LayerNorm, no affine)
    h, x2 = gated_residual_layernorm_modulate(h, attn1(x), gate, weight=norm2.weight, bias=norm2.bias)
    h, x3 = gated_residual_layernorm_modulate(h, attn2(x2, c), None, c_shift, c_scale)   # + norm3
    h     = gated_residual(h, ffn(x3), c_gate)        # on CUDA: ffn's GELU in its first GEMM (feed_forward)

as diffusers computes it: the modulation and the gated residuals in fp32, cast back once; norm2 (affine
FP32LayerNorm; ``nn.Identity`` when ``cross_attn_norm=False``: then a plain gated_residual) on the rounded h;
the cross-attention residual ungated. ``_keep_in_fp32_modules`` (diffusers keeps the norms,
``scale_shift_table``, the RoPE tables and the time embedder in fp32 when loading bf16/fp16 weights) changes
nothing here: the fused ops read fp32 modulation and norm weights as they are.

Attention (``WanFusedAttnProcessor`` in place of ``WanAttnProcessor``): q, k, v from the model's own
projections; q and k RMSNorm over the whole projection (all heads together, ``norm_q``/``norm_k`` of width
H * Dh), then, in the self-attention, the 3D RoPE per head, all in one ``qk_norm_rope(across_heads=True)``
launch for q and k; v is attended as the projection's view. I2V: the first ``S_ctx - 512`` context tokens
are the image context, attended separately with its own keys (``add_k_proj`` + ``norm_added_k``, the
model's modules: 257 tokens) and values, added to the text attention's output as diffusers does. The RoPE
tables ([1, S, 1, Dh], fp32 when the rope module is kept in fp32) are read in place as [S, Dh].

Which attention runs, as for FLUX: diffusers' ``dispatch_attention_fn`` when the user asked diffusers for an
attention backend (``shared.diffusers_dispatch_asked``) or switched the attention op off, else ``attend``
(``joint_attention``; under context parallelism, as the local op of Ulysses / Ring, on the self-attention
only, as diffusers passes its parallel config to the self-attention only).

Every Linear and the FeedForwards stay the model's own modules (peft LoRA keeps working); only the norms'
eps/weight/bias and ``scale_shift_table`` are read. ``validate`` refuses anything else.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.attention import FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanAttnProcessor,
    WanRotaryPosEmbed,
    WanTransformerBlock,
    _get_added_kv_projections,
    _get_qkv_projections,
)
from torch import Tensor, nn

from dit_kernels.models.family import Family, Shape
from dit_kernels.models.shared import (
    TensorMemo,
    WrappingProcessor,
    attend,
    check_type,
    check_unwrapped,
    diffusers_dispatch_asked,
    feed_forward,
    layernorm_kwargs,
    split_heads,
)
from dit_kernels.ops import (
    gated_residual,
    gated_residual_layernorm_modulate,
    layernorm_modulate,
    qk_norm_rope,
    rope_tables,
)
from dit_kernels.ops.qk_norm_rope import rotate_pairs
from dit_kernels.parallel.plan import gather, split, split_output
from dit_kernels.patching import BlockLayout, OpBackends, Patcher

NAME = "wan"
NATIVE_BACKENDS = ("cuda", "cuda_emu")  # the CUDA C++ kernels (dit_kernels._C, its CPU emulation)
TEXT_CONTEXT = 512  # WanAttnProcessor: the text context length, hard-coded by diffusers (the rest is image)


# ----------------------------------------------------------------------------------------- validate


def validate(transformer: WanTransformer3DModel) -> None:
    """Raise ValueError naming the first module or config value the fused path would not reproduce."""
    _check_type(transformer.rope, WanRotaryPosEmbed, "rope")
    for i, block in enumerate(transformer.blocks):
        _validate_block(block, f"blocks.{i}")


def _validate_block(block: nn.Module, name: str) -> None:
    _check_type(block, WanTransformerBlock, name)
    _check_unwrapped(block, name)
    dim = block.scale_shift_table.shape[-1]
    if tuple(block.scale_shift_table.shape) != (1, 6, dim):
        raise ValueError(f"wan: {name}.scale_shift_table has shape {tuple(block.scale_shift_table.shape)}, "
                         f"expected (1, 6, {dim})")  # fmt: skip
    for norm in ("norm1", "norm3"):
        _check_layer_norm(getattr(block, norm), f"{name}.{norm}", dim)
    if type(block.norm2) is not nn.Identity:
        _check_layer_norm(block.norm2, f"{name}.norm2", dim)
    _check_type(block.ffn, FeedForward, f"{name}.ffn")
    _validate_attention(block.attn1, f"{name}.attn1", cross=False)
    _validate_attention(block.attn2, f"{name}.attn2", cross=True)


def _check_layer_norm(norm: nn.Module, name: str, dim: int) -> None:
    _check_type(norm, FP32LayerNorm, name)
    if tuple(norm.normalized_shape) != (dim,):
        raise ValueError(f"wan: {name} normalises over {tuple(norm.normalized_shape)}, expected ({dim},)")


def _validate_attention(attn: nn.Module, name: str, cross: bool) -> None:
    """A stock WanAttention with diffusers' processor; q/k RMSNorms over the whole projection (what
    ``qk_norm_rope(across_heads=True)`` computes); image keys only on the cross-attention."""
    _check_type(attn, WanAttention, name)
    _check_type(attn.processor, WanAttnProcessor, f"{name}.processor")
    if attn.is_cross_attention != cross:
        raise ValueError(f"wan: {name} has is_cross_attention={attn.is_cross_attention}, expected {cross}")
    if attn.add_k_proj is not None and not cross:
        raise ValueError(f"wan: {name} has image-context projections (add_k_proj) on a self-attention")
    for norm in ("norm_q", "norm_k"):
        module = getattr(attn, norm)
        _check_type(module, nn.RMSNorm, f"{name}.{norm}")
        if tuple(module.normalized_shape) != (attn.inner_dim,):
            raise ValueError(f"wan: {name}.{norm} normalises over {tuple(module.normalized_shape)}, expected the "
                             f"whole projection ({attn.inner_dim},)")  # fmt: skip
    if attn.norm_q.eps != attn.norm_k.eps:
        raise ValueError(f"wan: {name}.norm_q/norm_k have different eps {attn.norm_q.eps}, {attn.norm_k.eps}")


_check_type = functools.partial(check_type, family=NAME)
_check_unwrapped = functools.partial(check_unwrapped, family=NAME)


# ----------------------------------------------------------------------------------------- apply


def apply(transformer: WanTransformer3DModel, patcher: Patcher) -> None:
    """Swap every block's forward and its self- and cross-attention processors. The CUDA C++ norm kernel
    reads its parameters in the input dtype, and Wan's modulation is fp32: on that backend the block
    forwards stay diffusers' (reported), the attention processors are swapped."""
    forward = _block_forward(patcher.ops)
    for i, block in enumerate(transformer.blocks):
        if patcher.ops.norm in NATIVE_BACKENDS:
            patcher.fallback(f"blocks.{i}.forward", f"the {patcher.ops.norm} norm_modulate kernel takes no fp32 "
                             "parameters with a bf16/fp16 input, and Wan's modulation is fp32")  # fmt: skip
            for attention in (block.attn1, block.attn2):
                patcher.set_processor(attention, WanFusedAttnProcessor(attention.processor, patcher.ops))
            continue
        what = "layernorm_modulate, gated_residual_layernorm_modulate x2, gated_residual"
        if type(block.norm2) is nn.Identity:
            what = "layernorm_modulate, gated_residual, gated_residual_layernorm_modulate, gated_residual"
        patcher.replace_block(block, forward, what, (block.attn1, block.attn2), WanFusedAttnProcessor)


def modulation(block: WanTransformerBlock, temb: Tensor) -> tuple[Tensor, ...]:
    """``(scale_shift_table + temb.float()).chunk(6)`` as diffusers computes it, in fp32: six [B, 1, D]
    views for temb [B, 6, D]; six [B, S, D] views for Wan 2.2 TI2V's per-token temb [B, S, 6, D]."""
    if temb.dim() == 4:
        return tuple(t.squeeze(2) for t in (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2))
    return (block.scale_shift_table + temb.float()).chunk(6, dim=1)


def _block_forward(ops: OpBackends):
    """WanTransformerBlock.forward (same signature) on fused ops: the math in the module docstring."""
    norm_op = ops.norm

    def forward(block, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                rotary_emb: Tensor) -> Tensor:  # fmt: skip
        shift, scale, gate, c_shift, c_scale, c_gate = modulation(block, temb)
        normed = layernorm_modulate(hidden_states, shift, scale, **layernorm_kwargs(block.norm1), backend=norm_op)
        attn = block.attn1(normed, None, None, rotary_emb)
        if type(block.norm2) is nn.Identity:
            hidden_states = normed = gated_residual(hidden_states, attn, gate, backend=norm_op)
        else:
            hidden_states, normed = gated_residual_layernorm_modulate(hidden_states, attn, gate,
                                                                      **layernorm_kwargs(block.norm2), backend=norm_op)  # fmt: skip
        attn = block.attn2(normed, encoder_hidden_states, None, None)
        hidden_states, normed = gated_residual_layernorm_modulate(hidden_states, attn, None, c_shift, c_scale,
                                                                  **layernorm_kwargs(block.norm3), backend=norm_op)  # fmt: skip
        return gated_residual(hidden_states, feed_forward(block.ffn, normed, ops), c_gate, backend=norm_op)

    return forward


# ----------------------------------------------------------------------------------------- attention


class WanFusedAttnProcessor(WrappingProcessor):
    """WanAttnProcessor with the whole-projection q/k RMSNorm and the RoPE in one ``qk_norm_rope`` launch.

    ``attn(hidden_states [B, S, D], encoder_hidden_states [B, T, D] | None, attention_mask, rotary_emb
    (cos, sin) [1, S, 1, Dh] | None)``; the math, the I2V image context and which attention runs in the module
    docstring. With the rope op switched off, diffusers' own norm modules and rotation. The original, the
    forwarded attributes and the no-argument build: ``WrappingProcessor``."""

    new_original = staticmethod(WanAttnProcessor)

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        rotary_emb: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Tensor:
        image_context = None
        if attn.add_k_proj is not None:
            split = encoder_hidden_states.shape[1] - TEXT_CONTEXT
            image_context, encoder_hidden_states = encoder_hidden_states[:, :split], encoder_hidden_states[:, split:]
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k = self._norm_rope(attn, query, key, rotary_emb)
        self_attention = encoder_hidden_states is None
        out = self._attend(q, k, split_heads(value, attn.heads), attention_mask, self_attention)
        if image_context is not None:
            key_img, value_img = _get_added_kv_projections(attn, image_context)
            key_img = split_heads(attn.norm_added_k(key_img), attn.heads)
            out = out + self._attend(q, key_img, split_heads(value_img, attn.heads), None, False)
        return attn.to_out[1](attn.to_out[0](out))

    def _norm_rope(self, attn: WanAttention, query: Tensor, key: Tensor,
                   rotary_emb: Optional[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:  # fmt: skip
        """q, k [B, S, H, Dh]: RMSNorm over H * Dh, then RoPE per head when ``rotary_emb`` is given."""
        if not self.ops.on("rope"):
            q, k = (split_heads(norm(t), attn.heads) for norm, t in ((attn.norm_q, query), (attn.norm_k, key)))
            if rotary_emb is not None:
                q, k = (_rotate(t, *rotary_emb) for t in (q, k))
            return q, k
        cos, sin = (None, None) if rotary_emb is None else _TABLES(lambda c: _rope_tables(c, rotary_emb[1]), rotary_emb[0])
        return qk_norm_rope(split_heads(query, attn.heads), split_heads(key, attn.heads), norm="rms",
                            across_heads=True, q_weight=attn.norm_q.weight, k_weight=attn.norm_k.weight,
                            eps=_eps(attn.norm_q, query), cos=cos, sin=sin, backend=self.ops.rope)  # fmt: skip

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], parallel: bool) -> Tensor:
        """[B, S, H, Dh] -> [B, S, H * Dh] in q's dtype; ``parallel``: the self-attention, which alone gets
        the parallel config (as WanAttnProcessor passes it)."""
        config = self._parallel_config if parallel else None
        if not self.ops.on("attention") or diffusers_dispatch_asked(self._attention_backend, mask):
            out = dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=config)  # fmt: skip
        else:
            out = attend(q, k, v, self.ops, parallel_config=config)
        return out.flatten(2, 3).type_as(q)


def _rope_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """WanRotaryPosEmbed's [1, S, 1, Dh] pair as the fp32 contiguous [S, Dh] tables the kernel reads (a view
    when the rope module is in fp32, as ``_keep_in_fp32_modules`` keeps it)."""
    return rope_tables(cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1]))


# Every block of one call gets the same rotary_emb pair: converted (when not fp32) once per call, keyed by cos.
_TABLES = TensorMemo()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """diffusers' Wan RoPE on x [B, S, H, Dh] with tables [1, S, 1, Dh] whose pairs repeat each angle:
    ``x * cos + rotate_pairs(x) * sin`` in the tables' precision, rounded to x's dtype (bit for bit
    WanAttnProcessor's ``x1 * cos - x2 * sin``, ``x1 * sin + x2 * cos``)."""
    return (x * cos + rotate_pairs(x, "interleaved") * sin).type_as(x)


def _eps(norm: nn.RMSNorm, x: Tensor) -> float:
    """nn.RMSNorm's eps; None means the input dtype's machine epsilon, as torch's rms_norm takes it."""
    return torch.finfo(x.dtype).eps if norm.eps is None else float(norm.eps)


# ----------------------------------------------------------------------------------------- family


def inputs(config, shape: Shape, randn: Callable, dtype: torch.dtype) -> dict:
    """WanPipeline's transformer call: latents [B, C, F, H, W], a flow-matching timestep in [0, 1000] per
    sample (fp32, as the scheduler gives it), the text context padded to its full length."""
    b = shape.batch
    return {
        "hidden_states": randn(b, config.in_channels, shape.frames, shape.height, shape.width),
        "timestep": torch.linspace(999.0, 250.0, b),
        "encoder_hidden_states": randn(b, shape.text_len, config.text_dim),
    }


_COMMON = dict(patch_size=(1, 2, 2), freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
# Wan 2.1 T2V 1.3B (Wan-AI/Wan2.1-T2V-1.3B-Diffusers)
_REAL = _COMMON | dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                       ffn_dim=8960, num_layers=30)  # fmt: skip
CONFIGS = {
    "real": _REAL,
    "small": _REAL | dict(num_layers=2),
    "tiny": _COMMON | dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=16,
                           freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32),  # fmt: skip
}

BLOCKS = BlockLayout(("blocks",), joint=False, batch_args=frozenset({"hidden_states", "encoder_hidden_states", "temb"}))

FAMILY = Family(
    name=NAME,
    classes=(WanTransformer3DModel,),
    validate=validate,
    apply=apply,
    blocks=BLOCKS,
    configs=CONFIGS,
    inputs=inputs,
    text_len=lambda config: TEXT_CONTEXT,
    traffic_shape=Shape(1, 60, 104, TEXT_CONTEXT, frames=21),  # 480 x 832, 81 frames: 32,760 tokens
    traffic_depth={"num_layers": 2},
    fp32_modules=("rope", "time_embedder", "scale_shift_table"),  # diffusers' fp32 modules besides the norms
    # diffusers' own plan (WanTransformer3DModel._cp_plan), stated here: the video tokens split at the first
    # block's input (the patch embedding's output, flattened), the RoPE tables' rows with them, per-token
    # timesteps (2.2 TI2V, [B, S]) split and 1-D ones whole; the text and I2V's image context stay whole on
    # every rank (the cross-attention attends locally); the tokens gathered after proj_out
    parallel_plan={
        "rope": {0: split_output(1, dims=4), 1: split_output(1, dims=4)},
        "blocks.0": {"hidden_states": split(1, dims=3)},
        "proj_out": gather(1, dims=3),
        "": {"timestep": split(1, dims=2)},
    },
    traffic_variants={"14B": dict(num_attention_heads=40, ffn_dim=13824)},  # Wan 2.1 T2V 14B: 5120 wide
)
