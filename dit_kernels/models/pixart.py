"""PixArt-α / PixArt-Σ patcher: ``PixArtTransformer2DModel``, diffusers 0.42 (α: ``use_additional_conditions``
with resolution and aspect-ratio embeddings; Σ: without; the patched blocks are the same).

Each block is a ``BasicTransformerBlock`` with ``norm_type="ada_norm_single"`` (the fused forward of
``basic_block``, 4 launches per block). The transformer's ``adaln_single`` gives every block the same
``timestep`` [B, 6 D]; the block adds its ``scale_shift_table`` [6, D]:
``(scale_shift_table[None] + timestep.reshape(B, 6, D)).chunk(6, dim=1)`` -> shift_msa, scale_msa,
gate_msa, shift_mlp, scale_mlp, gate_mlp [B, 1, D] (in the model dtype, as diffusers adds them). norm1
(LayerNorm, eps ``norm_eps``) before the self-attention; the cross-attention reads the un-normalised h and
its output is added ungated; norm2 before the feed-forward. The text mask reaches attn2 as the additive bias
[B, 1, T] the transformer builds from ``encoder_attention_mask``.

Text K/V of the cross-attention are the same at every step of a pipeline call, but they are recomputed
per step: the transformer projects the caption anew in every call, so reusing them would need a value
comparison, not an identity check.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from diffusers import PixArtTransformer2DModel
from diffusers.models.attention import BasicTransformerBlock
from torch import Tensor

from dit_kernels.models import basic_block
from dit_kernels.models.family import Family, Shape
from dit_kernels.parallel.plan import gather, split_output
from dit_kernels.patching import Patcher

NAME = "pixart"


def _modulation(block: BasicTransformerBlock, hidden_states: Tensor, timestep: Optional[Tensor],
                class_labels: Optional[Tensor]) -> tuple[Tensor, ...]:  # fmt: skip
    """The six [B, 1, D] chunks of ``scale_shift_table[None] + timestep.reshape(B, 6, D)``."""
    return (block.scale_shift_table[None] + timestep.reshape(hidden_states.shape[0], 6, -1)).chunk(6, dim=1)


def _check(block: BasicTransformerBlock, name: str) -> None:
    expected = (6, block.dim)
    if tuple(block.scale_shift_table.shape) != expected:
        raise ValueError(f"pixart: {name}.scale_shift_table has shape {tuple(block.scale_shift_table.shape)}, "
                         f"expected {expected}")  # fmt: skip


KIND = basic_block.BasicBlockKind(NAME, "ada_norm_single", _modulation, attn_norm="norm1", ff_norm="norm2",
                                 cross_attention=True, check=_check)  # fmt: skip


def validate(transformer: PixArtTransformer2DModel) -> None:
    """Raise ValueError naming the first block or module the fused path would not reproduce."""
    basic_block.validate_blocks(transformer, KIND)


def apply(transformer: PixArtTransformer2DModel, patcher: Patcher) -> None:
    """Swap every block's forward and its self- and cross-attention processors."""
    basic_block.apply_blocks(transformer, patcher, KIND)


def inputs(config, shape: Shape, randn: Callable, dtype: torch.dtype) -> dict:
    """PixArtSigmaPipeline's transformer call; samples after the first have padded text (masked keys)."""
    b = shape.batch
    mask = torch.ones(b, shape.text_len, dtype=torch.long)
    mask[1:, shape.text_len - max(1, shape.text_len // 4) :] = 0
    return {
        "hidden_states": randn(b, config.in_channels, shape.height, shape.width),
        "encoder_hidden_states": randn(b, shape.text_len, config.caption_channels),
        "encoder_attention_mask": mask,
        "timestep": torch.arange(b) * 37 % 1000,
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


_COMMON = dict(in_channels=4, out_channels=8, patch_size=2, norm_type="ada_norm_single", norm_elementwise_affine=False,
               norm_eps=1e-6, use_additional_conditions=False)  # fmt: skip
_REAL = _COMMON | dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, cross_attention_dim=1152,
                       caption_channels=4096, sample_size=128)  # PixArt-Σ  # fmt: skip
CONFIGS = {
    "real": _REAL,
    "small": _REAL | dict(num_layers=2),
    "tiny": _COMMON | dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, cross_attention_dim=16,
                           caption_channels=32, sample_size=8),  # fmt: skip
}

FAMILY = Family(
    name=NAME,
    classes=(PixArtTransformer2DModel,),
    validate=validate,
    apply=apply,
    blocks=basic_block.BLOCKS,
    configs=CONFIGS,
    inputs=inputs,
    text_len=lambda config: 300,
    traffic_shape=Shape(1, 128, 128, 300),  # 1024 px
    traffic_depth={"num_layers": 2},
    # the patch tokens split as pos_embed makes them, gathered after proj_out; the caption stays whole on every
    # rank: the cross-attention attends locally (its padding mask covers the whole caption), self-attention
    # over every rank's shard
    parallel_plan={"pos_embed": {0: split_output(1, dims=3)}, "proj_out": gather(1, dims=3)},
)
