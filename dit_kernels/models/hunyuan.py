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
from typing import Callable

import torch
from diffusers import HunyuanDiT2DModel
from diffusers.models.attention_processor import HunyuanAttnProcessor2_0
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.hunyuan_transformer_2d import AdaLayerNormShift, HunyuanDiTBlock
from torch import Tensor, nn

from dit_kernels.log_filters import without_records
from dit_kernels.models.family import Family, Shape
from dit_kernels.models.shared import (
    FusedAttnProcessor,
    check_type,
    check_unwrapped,
    feed_forward,
    layernorm_kwargs,
    modulate,
    validate_legacy_attention,
)
from dit_kernels.ops import gated_residual, gated_residual_layernorm_modulate
from dit_kernels.parallel.plan import gather, split, split_output
from dit_kernels.patching import BlockLayout, OpBackends, Patcher

NAME = "hunyuan"


# ----------------------------------------------------------------------------------------- validate


def validate(transformer: HunyuanDiT2DModel) -> None:
    """Raise ValueError naming the first module the fused path would not reproduce."""
    for i, block in enumerate(transformer.blocks):
        _validate_block(block, f"blocks.{i}")


def _validate_block(block: nn.Module, name: str) -> None:
    _check_type(block, HunyuanDiTBlock, name)
    check_unwrapped(block, name, NAME)
    _check_type(block.norm1, AdaLayerNormShift, f"{name}.norm1")
    norms = ["norm1.norm", "norm2", "norm3"] + ["skip_norm"] * (block.skip_linear is not None)
    for norm in norms:
        _check_type(block.get_submodule(norm), FP32LayerNorm, f"{name}.{norm}")
    for attn in ("attn1", "attn2"):
        validate_legacy_attention(getattr(block, attn), HunyuanAttnProcessor2_0, f"{name}.{attn}", NAME)


_check_type = functools.partial(check_type, family=NAME)


# ----------------------------------------------------------------------------------------- apply


def apply(transformer: HunyuanDiT2DModel, patcher: Patcher) -> None:
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
        return gated_residual(hidden_states, feed_forward(block.ff, normed, ops), backend=ops.norm)

    return forward


def _shift(norm: AdaLayerNormShift, temb: Tensor) -> Tensor:
    """AdaLayerNormShift's shift [B, D]: ``linear(silu(temb in fp32) cast back to temb's dtype)``."""
    return norm.linear(norm.silu(temb.float()).to(temb.dtype))


def _residual_norm(residual: Tensor, y: Tensor, norm: nn.LayerNorm, ops: OpBackends) -> tuple[Tensor, Tensor]:
    """``h = residual + y`` and ``norm(h)`` (affine LayerNorm in fp32, no modulation): one launch."""
    return gated_residual_layernorm_modulate(residual, y, **layernorm_kwargs(norm), backend=ops.norm)


# ----------------------------------------------------------------------------------------- examples


def inputs(config, shape: Shape, randn: Callable, dtype: torch.dtype) -> dict:
    """HunyuanDiTPipeline's transformer call: latents [B, C, H, W], Bert and T5 text of the config's lengths
    (samples after the first padded), the pipeline's 2-D RoPE tables, t in the latents' dtype."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    # the pipeline's module imports transformers' CLIPImageProcessor: its "requires torchvision" notice does
    # not apply to this function (no image is processed)
    with without_records("transformers.utils.import_utils", "requires torchvision (not installed)"):
        from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    b, patch = shape.batch, config.patch_size
    grid = (shape.height // patch, shape.width // patch)
    crops = get_resize_crop_region_for_grid(grid, 512 // 8 // patch)
    rope = get_2d_rotary_pos_embed(config.attention_head_dim, crops, grid, output_type="pt")
    mask, mask_t5 = torch.ones(b, config.text_len, dtype=torch.long), torch.ones(b, config.text_len_t5, dtype=torch.long)
    mask[1:, -max(1, config.text_len // 4) :] = 0
    mask_t5[1:, -max(1, config.text_len_t5 // 4) :] = 0
    conditioned = config.use_style_cond_and_image_meta_size
    return {
        "hidden_states": randn(b, config.in_channels, shape.height, shape.width),
        "timestep": (torch.arange(b) * 37 % 1000).to(dtype),
        "encoder_hidden_states": randn(b, config.text_len, config.cross_attention_dim),
        "text_embedding_mask": mask,
        "encoder_hidden_states_t5": randn(b, config.text_len_t5, config.cross_attention_dim_t5),
        "text_embedding_mask_t5": mask_t5,
        "image_meta_size": randn(b, 6).abs() * 512 if conditioned else None,
        "style": torch.zeros(b, dtype=torch.long) if conditioned else None,
        "image_rotary_emb": rope,
    }


_REAL = dict(num_attention_heads=16, attention_head_dim=88, in_channels=4, patch_size=2, hidden_size=1408,
             num_layers=40, sample_size=128, cross_attention_dim=1024, cross_attention_dim_t5=2048,
             pooled_projection_dim=1024, text_len=77, text_len_t5=256,
             use_style_cond_and_image_meta_size=False)  # v1.2  # fmt: skip
CONFIGS = {
    "real": _REAL,
    "small": _REAL | dict(num_layers=4),  # the fewest with a long-skip half (diffusers needs an even count >= 4)
    # Text lengths must match the inputs; HunyuanDiTPipeline hard-codes 77 / 256 (its callers override them).
    "tiny": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, hidden_size=16, num_layers=4, patch_size=2,
                 sample_size=8, cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=16, text_len=5,
                 text_len_t5=7),  # fmt: skip
}

FAMILY = Family(
    name=NAME,
    classes=(HunyuanDiT2DModel,),
    validate=validate,
    apply=apply,
    # long skips are handed from block to block by the transformer's loop (the ``skip`` argument)
    blocks=BlockLayout(("blocks",), joint=False, batch_args=frozenset({"hidden_states", "encoder_hidden_states",
                                                                      "temb", "skip"}),
                       bypass_args=("controlnet_block_samples",)),  # fmt: skip
    configs=CONFIGS,
    inputs=inputs,
    text_len=lambda config: config.get("text_len") + config.get("text_len_t5"),
    traffic_shape=Shape(1, 128, 128, 77 + 256),  # 1024 px; the cross-attention's 77 CLIP + 256 T5 tokens
    traffic_depth={"num_layers": 4},
    timestep_in_model_dtype=True,
    # the patch tokens split as pos_embed makes them, with the rows of the pipeline's 2-D RoPE table (cos, sin)
    # [S, Dh] that rotate them; the long skips join per token; gathered after proj_out. The text stays whole on
    # every rank: the cross-attention attends locally, self-attention over every rank's shard
    parallel_plan={"": {"image_rotary_emb": (split(0, dims=2), split(0, dims=2))},
                   "pos_embed": {0: split_output(1, dims=3)}, "proj_out": gather(1, dims=3)},  # fmt: skip
)
