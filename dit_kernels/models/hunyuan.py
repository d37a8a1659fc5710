"""HunyuanDiT patcher: ``HunyuanDiT2DModel`` (v1.1 with style / image-size conditioning, v1.2 without), diffusers 0.42.

Per block (``HunyuanDiTBlock``), on the image tokens ``h`` [B, S, D] with the text ``c`` [B, T, C] and
``shift = norm1.linear(silu(temb in fp32) in temb's dtype)`` [B, D] (AdaLayerNormShift: shift only, no
scale, no gates; every norm an affine FP32LayerNorm, eps 1e-6), 4 fused norm launches (5 with the long
skip; non-GEMM launches per block against eager's: ``python -m dit_kernels.bench.traffic --model hunyuan``)::

    h     = skip_linear(layernorm(cat([h, skip])))             # blocks after L/2 only (skip_norm, 2D wide)
    x     = layernorm_modulate(h, shift)                        # norm1
    h, x2 = gated_residual_layernorm_modulate(h, attn1(x))      # + norm2 (no gate, no modulation)
    h, x3 = gated_residual_layernorm_modulate(h, attn2(x2, c))  # + norm3
    h     = gated_residual(h, ff(x3))                 # on CUDA: ff's GELU in its first GEMM (feed_forward)

Attention (``FusedAttnProcessor`` in place of ``HunyuanAttnProcessor2_0``): q/k/v projections, then one
``qk_norm_rope`` launch applies the per-head LayerNorm of q and k and the interleaved RoPE, on q and k in
self-attention (attn1) and on q only in cross-attention (attn2, the text keys are not rotated); then
``joint_attention`` and ``to_out``. diffusers runs that LayerNorm in the model dtype, we in fp32.

RoPE tables: the pipeline builds ``image_rotary_emb`` with ``get_2d_rotary_pos_embed``, already fp32
contiguous [S, Dh] tables, which the kernels read as they are (``rope_tables`` inside ``qk_norm_rope``
makes no copy), so nothing converts them, per call or per block.

Not done: caching the cross-attention text K/V. They are constant within a pipeline call, but the
transformer rebuilds ``encoder_hidden_states`` (a fresh tensor) on every call, so a block has nothing
exact and cheap to key such a cache on; it belongs with the per-call state of the step cache.

Every Linear, the FeedForwards and the long-skip Linear stay the model's own modules (peft LoRA keeps
working); only the norm modules' eps/weight/bias are read. ``validate`` refuses anything else (another
processor, diffusers' fused QKV projections, another norm type, a forward already wrapped by a hook).
"""

from __future__ import annotations

import functools
import torch
from diffusers import HunyuanDiT2DModel
from diffusers.models.attention_processor import HunyuanAttnProcessor2_0
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.hunyuan_transformer_2d import AdaLayerNormShift, HunyuanDiTBlock
from torch import Tensor, nn

from dit_kernels.models.shared import (
    FusedAttnProcessor,
    OpBackends,
    check_type,
    check_unwrapped,
    feed_forward,
    layernorm_kwargs,
    modulate,
    validate_legacy_attention,
)
from dit_kernels.ops import gated_residual, gated_residual_layernorm_modulate

FAMILY = "hunyuan"
TRANSFORMER_CLASS = HunyuanDiT2DModel


# ----------------------------------------------------------------------------------------- validate


def validate(transformer: HunyuanDiT2DModel) -> None:
    """Raise ValueError naming the first module the fused path would not reproduce."""
    for i, block in enumerate(transformer.blocks):
        _validate_block(block, f"blocks.{i}")


def _validate_block(block: nn.Module, name: str) -> None:
    _check_type(block, HunyuanDiTBlock, name)
    check_unwrapped(block, name, FAMILY)
    _check_type(block.norm1, AdaLayerNormShift, f"{name}.norm1")
    norms = ["norm1.norm", "norm2", "norm3"] + ["skip_norm"] * (block.skip_linear is not None)
    for norm in norms:
        _check_type(block.get_submodule(norm), FP32LayerNorm, f"{name}.{norm}")
    for attn in ("attn1", "attn2"):
        validate_legacy_attention(getattr(block, attn), HunyuanAttnProcessor2_0, f"{name}.{attn}", FAMILY)


_check_type = functools.partial(check_type, family=FAMILY)


# ----------------------------------------------------------------------------------------- apply


def apply(transformer: HunyuanDiT2DModel, patcher) -> None:
    """Swap every block's forward and both attention processors of every block."""
    forward = _block_forward(patcher.ops)
    for block in transformer.blocks:
        skip = "layernorm_modulate (skip_norm), " if block.skip_linear is not None else ""
        what = f"{skip}layernorm_modulate, gated_residual_layernorm_modulate x2, gated_residual"
        patcher.replace_block(block, forward, what, (block.attn1, block.attn2), FusedAttnProcessor)


def _block_forward(ops: OpBackends):
    """HunyuanDiTBlock.forward on fused ops (the math in the module docstring)."""

    def forward(block, hidden_states, encoder_hidden_states=None, temb=None, image_rotary_emb=None, skip=None):
        if block.skip_linear is not None:
            joined = torch.cat([hidden_states, skip], dim=-1)
            hidden_states = block.skip_linear(modulate(joined, block.skip_norm, None, None, ops))
        normed = modulate(hidden_states, block.norm1.norm, _shift(block.norm1, temb), None, ops)
        attn = block.attn1(normed, image_rotary_emb=image_rotary_emb)
        hidden_states, normed = _residual_norm(hidden_states, attn, block.norm2, ops)
        attn = block.attn2(normed, encoder_hidden_states=encoder_hidden_states, image_rotary_emb=image_rotary_emb)
        hidden_states, normed = _residual_norm(hidden_states, attn, block.norm3, ops)
        return gated_residual(hidden_states, feed_forward(block.ff, normed), backend=ops.fused)

    return forward


def _shift(norm: AdaLayerNormShift, temb: Tensor) -> Tensor:
    """AdaLayerNormShift's shift [B, D]: ``linear(silu(temb in fp32) cast back to temb's dtype)``."""
    return norm.linear(norm.silu(temb.float()).to(temb.dtype))


def _residual_norm(residual: Tensor, y: Tensor, norm: nn.LayerNorm, ops: OpBackends) -> tuple[Tensor, Tensor]:
    """``h = residual + y`` and ``norm(h)`` (affine LayerNorm in fp32, no modulation): one launch."""
    return gated_residual_layernorm_modulate(residual, y, **layernorm_kwargs(norm), backend=ops.fused)
