"""The five families as configs built from kwargs (never from the hub) and their transformer inputs.

``"real"`` configs have the published widths and depths (DiT-XL/2, PixArt-Σ, SD3-medium, FLUX.1-dev,
HunyuanDiT v1.2; build them on the meta device for shape-only work); ``"small"`` is DiT-S/2 for DiT and
the real width at the smallest depth elsewhere (``SMALL_DEPTH``); ``"tiny"`` configs are DESIGN.md §4's
millisecond models. ``transformer_inputs`` makes one forward's keyword arguments for a latent of
``height x width`` (in latent pixels, before patching) and ``text_len`` text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

FAMILIES = ("dit", "pixart", "sd3", "flux", "hunyuan")

CONFIGS = {
    ("dit", "real"): dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                          sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
                          norm_elementwise_affine=False),
    ("dit", "small"): dict(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
                           sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
                           norm_elementwise_affine=False),  # DiT-S/2
    ("dit", "tiny"): dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8,
                          patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
                          norm_elementwise_affine=False),
    ("pixart", "real"): dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                             num_layers=28, cross_attention_dim=1152, caption_channels=4096, sample_size=128,
                             patch_size=2, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                             use_additional_conditions=False),
    ("pixart", "tiny"): dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                             cross_attention_dim=16, caption_channels=32, sample_size=8, patch_size=2,
                             norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                             use_additional_conditions=False),
    ("sd3", "real"): dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                          attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                          caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
    ("sd3", "tiny"): dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                          caption_projection_dim=16, pooled_projection_dim=24, pos_embed_max_size=16),
    ("flux", "real"): dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                           num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                           guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    ("flux", "tiny"): dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                           guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    ("hunyuan", "real"): dict(num_attention_heads=16, attention_head_dim=88, in_channels=4, patch_size=2,
                              hidden_size=1408, num_layers=40, sample_size=128, cross_attention_dim=1024,
                              cross_attention_dim_t5=2048, pooled_projection_dim=1024, text_len=77, text_len_t5=256,
                              use_style_cond_and_image_meta_size=False),
    ("hunyuan", "tiny"): dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, hidden_size=16, num_layers=4,
                              patch_size=2, sample_size=8, cross_attention_dim=16, cross_attention_dim_t5=16,
                              pooled_projection_dim=16, text_len=5, text_len_t5=7),
}  # fmt: skip


# The smallest depth that still has every block kind (SD3's context_pre_only last block, HunyuanDiT's
# long-skip second half, FLUX's double and single blocks).
SMALL_DEPTH = {"pixart": {"num_layers": 2}, "sd3": {"num_layers": 2}, "flux": {"num_layers": 1, "num_single_layers": 1},
               "hunyuan": {"num_layers": 4}}  # fmt: skip


def transformer_class(family: str):
    import diffusers

    names = {"dit": "DiTTransformer2DModel", "pixart": "PixArtTransformer2DModel", "sd3": "SD3Transformer2DModel",
             "flux": "FluxTransformer2DModel", "hunyuan": "HunyuanDiT2DModel"}  # fmt: skip
    return getattr(diffusers, names[family])


def build(family: str, size: str = "tiny", **overrides) -> torch.nn.Module:
    """The family's transformer from its ``size`` config with ``overrides``, in eval mode, on the current
    default device (``with torch.device("meta"): build(...)`` makes a weightless one)."""
    if size == "small" and family != "dit":
        size, overrides = "real", SMALL_DEPTH[family] | overrides
    return transformer_class(family)(**(CONFIGS[family, size] | overrides)).eval()


@dataclass(frozen=True)
class Shape:
    """One forward's problem size: latent ``height x width`` (latent pixels), ``text_len`` text tokens."""

    batch: int
    height: int
    width: int
    text_len: int = 0


def default_text_len(family: str, config) -> int:
    """The text length the family's pipeline feeds (DiT has no text; HunyuanDiT's is fixed by its config)."""
    return {"dit": 0, "pixart": 300, "sd3": 333, "flux": 512, "hunyuan": config.get("text_len")}[family]


def transformer_inputs(family: str, model, shape: Shape, dtype: torch.dtype, device="cpu", seed: int = 0) -> dict:
    """Keyword arguments of one ``model(**inputs)`` call, as the family's pipeline builds them."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> Tensor:
        if torch.device(device).type == "meta":
            return torch.empty(*size, device="meta", dtype=dtype)
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    inputs = _INPUTS[family](model.config, shape, randn, dtype)
    return {k: _to_device(v, device) for k, v in inputs.items()}


def _to_device(value, device):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


def set_timestep(family: str, inputs: dict, t: float) -> None:
    """Put diffusion time ``t`` in [0, 1000] into ``inputs`` the way the family's pipeline passes it."""
    latents = inputs["hidden_states"]  # the pipelines make the timestep on the latents' device
    batch, dtype = latents.shape[0], latents.dtype
    value = torch.full((batch,), t / 1000 if family == "flux" else t, device=latents.device)
    inputs["timestep"] = value.to(dtype) if family in ("flux", "hunyuan") else value


def _dit_inputs(config, shape: Shape, randn: Callable, dtype: torch.dtype) -> dict:
    b = shape.batch
    return {
        "hidden_states": randn(b, config.in_channels, shape.height, shape.width),
        "timestep": torch.arange(b) * 37 % 1000,
        "class_labels": torch.arange(b) * 11 % config.num_embeds_ada_norm,
    }


def _pixart_inputs(config, shape: Shape, randn: Callable, dtype: torch.dtype) -> dict:
    b = shape.batch
    mask = torch.ones(b, shape.text_len, dtype=torch.long)
    mask[1:, shape.text_len - max(1, shape.text_len // 4) :] = 0  # later batch items: padded text
    return {
        "hidden_states": randn(b, config.in_channels, shape.height, shape.width),
        "encoder_hidden_states": randn(b, shape.text_len, config.caption_channels),
        "encoder_attention_mask": mask,
        "timestep": torch.arange(b) * 37 % 1000,
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def _sd3_inputs(config, shape: Shape, randn: Callable, dtype: torch.dtype) -> dict:
    b = shape.batch
    return {
        "hidden_states": randn(b, config.in_channels, shape.height, shape.width),
        "encoder_hidden_states": randn(b, shape.text_len, config.joint_attention_dim),
        "pooled_projections": randn(b, config.pooled_projection_dim),
        "timestep": torch.arange(b) * 37 % 1000,
    }


def _flux_inputs(config, shape: Shape, randn: Callable, dtype: torch.dtype) -> dict:
    """FLUX's pipeline packs 2x2 latent patches into tokens: ``height x width`` here is the token grid."""
    b = shape.batch  # the pipeline casts ids to the latents' dtype; positions stay exact up to 256 in bf16
    rows, cols = torch.meshgrid(torch.arange(shape.height), torch.arange(shape.width), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).flatten(0, 1).to(dtype)
    inputs = {
        "hidden_states": randn(b, shape.height * shape.width, config.in_channels),
        "encoder_hidden_states": randn(b, shape.text_len, config.joint_attention_dim),
        "pooled_projections": randn(b, config.pooled_projection_dim),
        "timestep": ((torch.arange(b) * 37 % 1000 + 1) / 1000).to(dtype),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(shape.text_len, 3, dtype=dtype),
    }
    if config.guidance_embeds:
        inputs["guidance"] = torch.full((b,), 3.5)  # fp32, as the pipeline makes it
    return inputs


def _hunyuan_inputs(config, shape: Shape, randn: Callable, dtype: torch.dtype) -> dict:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    b, patch = shape.batch, config.patch_size
    grid = (shape.height // patch, shape.width // patch)
    crops = get_resize_crop_region_for_grid(grid, 512 // 8 // patch)
    head_dim = config.attention_head_dim
    rope = get_2d_rotary_pos_embed(head_dim, crops, grid, output_type="pt")
    mask, mask_t5 = torch.ones(b, config.text_len, dtype=torch.long), torch.ones(b, config.text_len_t5, dtype=torch.long)
    mask[1:, -max(1, config.text_len // 4) :] = 0
    mask_t5[1:, -max(1, config.text_len_t5 // 4) :] = 0
    return {
        "hidden_states": randn(b, config.in_channels, shape.height, shape.width),
        "timestep": (torch.arange(b) * 37 % 1000).to(dtype),  # the pipeline passes t in the latents' dtype
        "encoder_hidden_states": randn(b, config.text_len, config.cross_attention_dim),
        "text_embedding_mask": mask,
        "encoder_hidden_states_t5": randn(b, config.text_len_t5, config.cross_attention_dim_t5),
        "text_embedding_mask_t5": mask_t5,
        "image_meta_size": randn(b, 6).abs() * 512 if config.use_style_cond_and_image_meta_size else None,
        "style": torch.zeros(b, dtype=torch.long) if config.use_style_cond_and_image_meta_size else None,
        "image_rotary_emb": rope,
    }


_INPUTS = {"dit": _dit_inputs, "pixart": _pixart_inputs, "sd3": _sd3_inputs, "flux": _flux_inputs,
           "hunyuan": _hunyuan_inputs}  # fmt: skip
