"""DiT patcher: ``DiTTransformer2DModel`` (DiT-XL/2 and smaller), diffusers 0.42.

Each block is a ``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"`` (the fused forward of
``basic_block``, 3 launches per block): norm1 is an ``AdaLayerNormZero`` that embeds the timestep and class
label again in every block with its own weights (``norm1.emb``, a ``CombinedTimestepLabelEmbeddings``), as
diffusers does (only the weightless sinusoidal timestep projection is computed once per call), then
``norm1.linear(silu(emb)).chunk(6)`` -> shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp [B, D];
``norm1.norm`` (LayerNorm, no affine, eps 1e-6) before the self-attention, ``norm3`` (LayerNorm, no affine,
eps ``norm_eps`` = 1e-5) before the gelu-tanh feed-forward; no cross-attention.
The model's own embedding and Linear modules are called (LoRA-safe). DiT takes square latents only.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings, LabelEmbedding, Timesteps
from diffusers.models.normalization import AdaLayerNormZero
from torch import Tensor

from dit_kernels.models import basic_block
from dit_kernels.models.family import Family, Shape
from dit_kernels.models.shared import TensorMemo, check_type, modulation
from dit_kernels.parallel.plan import gather, split_output
from dit_kernels.patching import Patcher

NAME = "dit"


def _modulation(block: BasicTransformerBlock, hidden_states: Tensor, timestep: Optional[Tensor],
                class_labels: Optional[Tensor]) -> tuple[Tensor, ...]:  # fmt: skip
    """AdaLayerNormZero's six [B, D] chunks: ``linear(silu(emb(timestep, class_labels)))`` with
    ``CombinedTimestepLabelEmbeddings``' math (in the hidden dtype, as ``AdaLayerNormZero.forward`` does),
    through the block's own modules; only the weightless sinusoidal projection of the timestep, the same in
    every block, is shared (``_SINUSOIDS``)."""
    emb = block.norm1.emb
    time_proj = emb.time_proj
    config = (time_proj.num_channels, time_proj.flip_sin_to_cos, time_proj.downscale_freq_shift, time_proj.scale)
    projected = _SINUSOIDS(time_proj, timestep, config)
    conditioning = emb.timestep_embedder(projected.to(dtype=hidden_states.dtype)) + emb.class_embedder(class_labels)
    return modulation(block.norm1, conditioning, 6)


# The weightless sinusoidal projection (``time_proj``, ~12 small launches) is the same in every block: computed
# once per transformer call, keyed by the projection's configuration.
_SINUSOIDS = TensorMemo()


def _check(block: BasicTransformerBlock, name: str) -> None:
    check_type(block.norm1, AdaLayerNormZero, f"{name}.norm1", NAME)
    if block.norm1.emb is None:
        raise ValueError(f"dit: {name}.norm1 has no timestep/class embedding (AdaLayerNormZero.emb is None)")
    check_type(block.norm1.emb, CombinedTimestepLabelEmbeddings, f"{name}.norm1.emb", NAME)
    check_type(block.norm1.emb.time_proj, Timesteps, f"{name}.norm1.emb.time_proj", NAME)
    check_type(block.norm1.emb.class_embedder, LabelEmbedding, f"{name}.norm1.emb.class_embedder", NAME)


KIND = basic_block.BasicBlockKind(NAME, "ada_norm_zero", _modulation, attn_norm="norm1.norm", ff_norm="norm3",
                                 cross_attention=False, check=_check)  # fmt: skip


def validate(transformer: DiTTransformer2DModel) -> None:
    """Raise ValueError naming the first block or module the fused path would not reproduce."""
    basic_block.validate_blocks(transformer, KIND)


def apply(transformer: DiTTransformer2DModel, patcher: Patcher) -> None:
    """Swap every block's forward and its self-attention processor."""
    basic_block.apply_blocks(transformer, patcher, KIND)


def inputs(config, shape: Shape, randn: Callable, dtype: torch.dtype) -> dict:
    """DiTPipeline's transformer call: latents [B, C, H, W] (square), integer timesteps and class labels."""
    b = shape.batch
    return {
        "hidden_states": randn(b, config.in_channels, shape.height, shape.width),
        "timestep": torch.arange(b) * 37 % 1000,
        "class_labels": torch.arange(b) * 11 % config.num_embeds_ada_norm,
    }


# Learned sigma: out_channels = 2 * in_channels, which DiTPipeline reads.
_COMMON = dict(in_channels=4, out_channels=8, sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
               norm_type="ada_norm_zero", norm_elementwise_affine=False)  # fmt: skip
CONFIGS = {
    "real": _COMMON | dict(num_attention_heads=16, attention_head_dim=72, num_layers=28),  # DiT-XL/2
    "small": _COMMON | dict(num_attention_heads=6, attention_head_dim=64, num_layers=12),  # DiT-S/2
    "tiny": _COMMON | dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8),
}

FAMILY = Family(
    name=NAME,
    classes=(DiTTransformer2DModel,),
    validate=validate,
    apply=apply,
    blocks=basic_block.BLOCKS,
    configs=CONFIGS,
    inputs=inputs,
    text_len=lambda config: 0,
    traffic_shape=Shape(1, 32, 32, 0),  # 256 px
    traffic_depth={"num_layers": 2},
    # self-attention only: the patch tokens split along the sequence as pos_embed makes them, gathered after
    # proj_out_2 (norm_out and its modulation act per token)
    parallel_plan={"pos_embed": {0: split_output(1, dims=3)}, "proj_out_2": gather(1, dims=3)},
)
