"""The registered families' example models (built from kwargs, never from the hub) and their inputs.

Everything here reads the family's ``Family`` (``dit_kernels.models``): ``"real"`` configs have the published
widths and depths (build them on the meta device for shape-only work), ``"small"`` is DiT-S/2 for DiT and
the real width at the smallest depth with every block kind elsewhere, ``"tiny"`` are the
millisecond models of each family's file. ``transformer_inputs`` makes one forward's keyword arguments for a ``Shape``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dit_kernels.log_filters import without_records
from dit_kernels.models import FAMILY_MODULES, Shape, family_named

FAMILIES = FAMILY_MODULES

__all__ = ["FAMILIES", "Shape", "build", "to_dtype", "default_text_len", "transformer_inputs", "set_timestep",
           "tokens", "prediction_channels"]  # fmt: skip


def build(family: str, size: str = "tiny", **overrides) -> torch.nn.Module:
    """The family's transformer from its ``size`` config with ``overrides``, in eval mode, on the current
    default device (``with torch.device("meta"): build(...)`` makes a weightless one)."""
    return family_named(family).build(size, **overrides)


def to_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model.to(dtype)`` without diffusers' "should be kept in float32: []" warning, which its ``to`` logs on
    every dtype cast even when the model keeps no module in fp32 (the empty list); a non-empty list is logged."""
    with without_records("diffusers.models.modeling_utils", "should be kept in float32: []."):
        return model.to(dtype)


def default_text_len(family: str, config) -> int:
    """The text length the family's pipeline feeds (0: no text)."""
    return family_named(family).text_len(config)


def transformer_inputs(family: str, model, shape: Shape, dtype: torch.dtype, device="cpu", seed: int = 0) -> dict:
    """Keyword arguments of one ``model(**inputs)`` call, as the family's pipeline builds them; on the meta
    device every tensor is empty."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> Tensor:
        if torch.device(device).type == "meta":
            return torch.empty(*size, device="meta", dtype=dtype)
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    inputs = family_named(family).inputs(model.config, shape, randn, dtype)
    return {k: _to_device(v, device) for k, v in inputs.items()}


def _to_device(value, device):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


def set_timestep(family: str, inputs: dict, t: float) -> None:
    """Put diffusion time ``t`` in [0, 1000] into ``inputs`` the way the family's pipeline passes it (on the
    latents' device, as the pipelines make it)."""
    latents = inputs["hidden_states"]
    inputs["timestep"] = family_named(family).timestep(t, latents.shape[0], latents)


def tokens(family: str, config, shape: Shape) -> int:
    """Image (video) tokens of one sample: the latent grid over the transformer's patch size, (h, w) or
    (frames, h, w) (``config``: the model's config or constructor kwargs; a packing family's shape is the
    token grid already)."""
    patch = 1 if family_named(family).latent_packing > 1 else config["patch_size"]
    frames, rows, cols = patch if isinstance(patch, (tuple, list)) else (1, patch, patch)
    return shape.frames // frames * (shape.height // rows) * (shape.width // cols)


def prediction_channels(family: str) -> int:
    """The channel dim of the latents and of the transformer's prediction: last for a family whose pipeline
    packs latents into tokens ([B, tokens, C]), else 1 ([B, C, H, W])."""
    return -1 if family_named(family).latent_packing > 1 else 1
