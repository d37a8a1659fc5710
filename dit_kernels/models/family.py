"""``Family``: everything the library knows about one diffusers transformer class, in one value.

Each ``models/<name>.py`` exports ``FAMILY = Family(...)``; ``models/__init__`` lists the modules. The
api, the step cache, the graph runner, the bench, the traffic model and the tests read these fields and
never name a family themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from dit_kernels.patching import BlockLayout, Patcher

SIZES = ("tiny", "small", "real")


@dataclass(frozen=True)
class Shape:
    """One forward's problem size: latent ``height x width`` (latent pixels before the transformer's own
    patching; for a family with ``latent_packing`` > 1, the token grid), ``text_len`` text tokens, ``frames``
    latent frames (video families; images have one)."""

    batch: int
    height: int
    width: int
    text_len: int = 0
    frames: int = 1


# (config, shape, randn(*size) -> Tensor in the model dtype, dtype) -> one forward's keyword arguments
InputBuilder = Callable[[Any, Shape, Callable[..., Tensor], torch.dtype], dict]


@dataclass(frozen=True)
class Family:
    """One model family.

    ``name``: in reports, the bench's ``--model`` and the registry (the module's name). ``classes``: the
    diffusers transformer classes it patches, matched exactly by type (a subclass may override what is
    replaced). ``validate(transformer)``: ValueError naming the first module or config value the fused path
    would not reproduce, before anything changes. ``apply(transformer, patcher)``: the swaps, through
    ``patcher`` (which honours ``patcher.ops``' per-op switches). ``blocks``: the step cache's block layout.

    Examples: ``configs`` maps "tiny" (milliseconds on CPU), "small" (DiT-S/2; others: real width, the
    fewest blocks with every block kind) and "real" (published widths) to constructor kwargs: the one source
    of truth for tests, bench and traffic model. ``inputs(config, shape, randn, dtype)``: one forward's
    keyword arguments as the pipeline builds them. ``timestep_scale``: the transformer's timestep is
    ``t * timestep_scale`` for diffusion time t in [0, 1000]; ``timestep_in_model_dtype``: the pipeline
    passes it in the latents' dtype (else fp32/long as made). ``latent_packing``: latent pixels per token
    side the pipeline packs before the transformer (FLUX: 2; then the latents are [B, tokens, C], else
    [B, C, H, W]). ``text_len(config)``: the text length its pipeline feeds (0: no text).
    ``traffic_shape`` / ``traffic_depth``: the traffic model's real shape and the depth overrides that give
    every block kind twice (the last of each kind is counted); ``traffic_variants``: more traffic rows, a label
    -> overrides of the real config (another published width). ``parallel_plan``: the context-parallel plan
    where diffusers has none. ``fp32_modules``: entries of the class's ``_keep_in_fp32_modules`` that are not
    norms and that the patched path takes in fp32 as diffusers does (patch accepts them in a bf16/fp16 model
    loaded with those modules kept in fp32; a kept norm is always accepted)."""

    name: str
    classes: tuple[type, ...]
    validate: Callable[[nn.Module], None]
    apply: Callable[[nn.Module, Patcher], None]
    blocks: BlockLayout
    configs: Mapping[str, Mapping[str, Any]]
    inputs: InputBuilder
    text_len: Callable[[Any], int]
    traffic_shape: Shape
    traffic_depth: Mapping[str, int]
    timestep_scale: float = 1.0
    timestep_in_model_dtype: bool = False
    latent_packing: int = 1
    parallel_plan: Optional[Any] = None
    fp32_modules: tuple[str, ...] = ()
    traffic_variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        missing = set(SIZES) - set(self.configs)
        if missing:
            raise ValueError(f"family {self.name}: configs lack {sorted(missing)}")

    def build(self, size: str = "tiny", **overrides) -> nn.Module:
        """The transformer of config ``size`` with ``overrides``, in eval mode, on the current default device
        (``with torch.device("meta"): family.build("real")`` makes a weightless one)."""
        if size not in self.configs:
            raise ValueError(f"family {self.name}: unknown config {size!r}; choose one of {SIZES}")
        return self.classes[0](**{**self.configs[size], **overrides}).eval()

    def timestep(self, t: float, batch: int, latents: Tensor) -> Tensor:
        """Diffusion time ``t`` in [0, 1000] as the pipeline passes it for ``batch`` samples."""
        value = torch.full((batch,), t * self.timestep_scale, device=latents.device)
        return value.to(latents.dtype) if self.timestep_in_model_dtype else value
