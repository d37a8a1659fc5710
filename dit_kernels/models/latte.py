"""Latte patcher: ``LatteTransformer3DModel`` (Latte-1; GenTron's design of a text-to-video DiT: spatial
blocks and temporal blocks, alternating), diffusers 0.42.

Latents [B, C, F, H, W]; the transformer folds the frames into the batch. Each spatial block
(``transformer_blocks[i]``) runs on h [B * F, S, D] (S = H/2 * W/2 patches of one frame) with a
cross-attention to the text; then the transformer swaps the batch and sequence axes and the temporal block
(``temporal_transformer_blocks[i]``) runs on [B * S, F, D]: a self-attention across the frames at each
spatial position, no cross-attention. Both are ``BasicTransformerBlock`` with ``norm_type="ada_norm_single"``,
PixArt's block: the fused forward of ``basic_block`` with PixArt's modulation (``scale_shift_table + t``,
the transformer's ``adaln_single`` output repeated per frame / per position), 4 fused launches per spatial
block, 3 per temporal block (no cross-attention residual).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from diffusers import LatteTransformer3DModel

from dit_kernels.models import basic_block, pixart
from dit_kernels.models.family import Family, Shape
from dit_kernels.parallel.plan import gather, local, repeated, split_output
from dit_kernels.patching import Patcher

NAME = "latte"
SPATIAL = dataclasses.replace(pixart.KIND, family=NAME)  # PixArt's block: modulation, norms, cross-attention
TEMPORAL = dataclasses.replace(SPATIAL, cross_attention=False)
KINDS = {"transformer_blocks": SPATIAL, "temporal_transformer_blocks": TEMPORAL}


def validate(transformer: LatteTransformer3DModel) -> None:
    """Raise ValueError naming the first block or module the fused path would not reproduce."""
    for blocks, kind in KINDS.items():
        basic_block.validate_blocks(transformer, kind, blocks)


def apply(transformer: LatteTransformer3DModel, patcher: Patcher) -> None:
    """Swap every spatial and temporal block's forward and its attention processors."""
    for blocks, kind in KINDS.items():
        basic_block.apply_blocks(transformer, patcher, kind, blocks)


def inputs(config, shape: Shape, randn: Callable, dtype: torch.dtype) -> dict:
    """LattePipeline's transformer call (``prompt_embeds`` given: no tokenizer, no mask)."""
    b = shape.batch
    return {
        "hidden_states": randn(b, config.in_channels, shape.frames, shape.height, shape.width),
        "encoder_hidden_states": randn(b, shape.text_len, config.caption_channels),
        "timestep": torch.arange(b) * 37 % 1000,
        "enable_temporal_attentions": True,
    }


_COMMON = dict(in_channels=4, out_channels=8, patch_size=2, norm_type="ada_norm_single", norm_elementwise_affine=False,
               norm_eps=1e-6, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, attention_bias=True)  # fmt: skip
_REAL = _COMMON | dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, cross_attention_dim=1152,
                       caption_channels=4096, sample_size=64, video_length=16)  # Latte-1  # fmt: skip
CONFIGS = {
    "real": _REAL,
    "small": _REAL | dict(num_layers=2),
    "tiny": _COMMON | dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, cross_attention_dim=16,
                           caption_channels=32, sample_size=8, video_length=3),  # fmt: skip
}


# The step cache's view: spatial and temporal blocks in turns, the stream reshaped between them (spatial
# [B * F, S, D], temporal [B * S, F, D]); a call without temporal attention leaves half the blocks out, so it
# runs uncached.
BLOCKS = dataclasses.replace(basic_block.BLOCKS, block_lists=tuple(KINDS), interleaved=True, reshapes=True,
                             bypass_values=(("enable_temporal_attentions", False),))  # fmt: skip

FAMILY = Family(
    name=NAME,
    classes=(LatteTransformer3DModel,),
    validate=validate,
    apply=apply,
    blocks=BLOCKS,
    configs=CONFIGS,
    inputs=inputs,
    text_len=lambda config: 120,
    traffic_shape=Shape(1, 64, 64, 120, frames=16),  # 512 x 512, 16 frames
    traffic_depth={"num_layers": 2},
    # each frame's patch tokens split as pos_embed makes them ([B * F, S, D]), gathered after proj_out; the
    # spatial self-attention over every rank's shard, the cross-attention to the (whole) caption local; the
    # temporal blocks attend across the frames at each of the rank's positions, locally, and take every P-th
    # row of their per-position timesteps ([B * S, 6D], each sample's repeated S times)
    parallel_plan={"pos_embed": {0: split_output(1, dims=3)},
                   "temporal_transformer_blocks.*": {"timestep": repeated(0, dims=2)},
                   "temporal_transformer_blocks.*.attn1": local(),
                   "proj_out": gather(1, dims=3)},  # fmt: skip
)
