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

from typing import Optional

from diffusers import DiTTransformer2DModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings, LabelEmbedding, Timesteps
from diffusers.models.normalization import AdaLayerNormZero
from torch import Tensor

from dit_kernels.models import basic_block
from dit_kernels.models.shared import TensorMemo, check_type, modulation

FAMILY = "dit"
TRANSFORMER_CLASS = DiTTransformer2DModel


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
    check_type(block.norm1, AdaLayerNormZero, f"{name}.norm1", FAMILY)
    if block.norm1.emb is None:
        raise ValueError(f"dit: {name}.norm1 has no timestep/class embedding (AdaLayerNormZero.emb is None)")
    check_type(block.norm1.emb, CombinedTimestepLabelEmbeddings, f"{name}.norm1.emb", FAMILY)
    check_type(block.norm1.emb.time_proj, Timesteps, f"{name}.norm1.emb.time_proj", FAMILY)
    check_type(block.norm1.emb.class_embedder, LabelEmbedding, f"{name}.norm1.emb.class_embedder", FAMILY)


LAYOUT = basic_block.BlockLayout(FAMILY, "ada_norm_zero", _modulation, attn_norm="norm1.norm", ff_norm="norm3",
                                 cross_attention=False, check=_check)  # fmt: skip


def validate(transformer: DiTTransformer2DModel) -> None:
    """Raise ValueError naming the first block or module the fused path would not reproduce."""
    basic_block.validate_blocks(transformer, LAYOUT)


def apply(transformer: DiTTransformer2DModel, patcher) -> None:
    """Swap every block's forward and its self-attention processor."""
    basic_block.apply_blocks(transformer, patcher, LAYOUT)
