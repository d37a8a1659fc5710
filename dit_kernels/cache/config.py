"""``CacheConfig``: the step cache's knobs, checked when made, with the defaults and why."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

CFG_MODES = ("joint", "per_half")


@dataclass(frozen=True)
class CacheConfig:
    """Step caching by output extrapolation with error control (``dit_kernels.patch(..., cache=
    CacheConfig(...))``; a float ``cache=0.1`` means ``CacheConfig(threshold=0.1)``).

    A computed step runs the whole transformer and keeps its output (the sample it returns) as a node; a
    skipped step runs no block and returns the output extrapolated from the last ``fit_steps`` nodes by the
    polynomial of degree ``order`` (TaylorSeer's finite differences, on uneven steps). At each computed
    step the extrapolation is checked against the real output (its relative L1 miss) and the interval
    between computed steps is scaled by ``threshold / miss``, as an ODE solver sizes its steps
    (``dit_kernels.cache.policy``). The denoiser's output is what moves smoothly from step to step: the
    residuals of the blocks inside it jitter with the timestep modulation, so extrapolating them, or
    judging skips by the first block's change (First Block Cache, v1 of this cache), is worse at every cost.

    - ``threshold`` (0.1): the tolerated miss of the extrapolated output, relative L1; 0 never skips (the
      output is then exactly the uncached one). Chosen with ``max_consecutive_skips`` from the quality-vs-
      cost curves of ``python -m dit_kernels.bench.trained --sweep`` (README): on both trained models,
      3.6-4.2x fewer block evaluations at 41-50 dB PSNR of the uncached images without guidance.
    - ``order`` (1): degree of the extrapolation. 0 reuses the last computed output, 1 extrapolates
      linearly from the last two computed steps, 2 quadratically from three. On the trained models 1 was
      best at every cost: 2 amplifies the step-to-step jitter, 0 drifts.
    - ``fit_steps`` (2): computed steps the extrapolation is fit to (>= ``order + 1``); more than
      ``order + 1`` fits by least squares, which on the trained models lost 1-4 dB at equal cost.
    - ``warmup_steps`` (2): the first steps of a call are always computed (with ``order + 1`` nodes, the
      first miss is measured one step later, so order 1 computes three steps before its first skip).
    - ``max_consecutive_skips`` (5): the longest skip run the plan may make (``interval <= 6``). Longer runs
      extrapolate further than the miss measured at their start can vouch for: at equal cost, 8 with
      threshold 0.05 lost 2 dB against 5 with 0.1 on both models.
    - ``final_steps_computed`` (2): the last steps of a call are always computed (they set fine detail);
      applies when the step count is known (a pipeline call, or ``cache_session(num_steps=...)``).
    - ``cfg`` ("joint"): a batched classifier-free-guidance call is planned on the whole batch;
      "per_half" plans the two halves independently (each its own nodes and interval; when only one half
      computes, the blocks run on that half's rows only). An odd batch is one group either way. Joint
      won on the trained DiT with guidance 2 (23.4 dB at 4.2x against per-half's 23.4 dB at 4.0x and
      19.7 dB at 2.6x): the guided ``u + g (c - u)`` cancels the halves' extrapolation errors where both are
      predicted from the same steps, and doubles one half's where the other is computed.
    """

    threshold: float = 0.1
    warmup_steps: int = 2
    max_consecutive_skips: int = 5
    final_steps_computed: int = 2
    cfg: str = "joint"
    order: int = 1
    fit_steps: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TypeError(f"CacheConfig.threshold must be a number, got {self.threshold!r}")
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"CacheConfig.threshold must be finite and >= 0, got {self.threshold!r}")
        for name, least in (("warmup_steps", 0), ("max_consecutive_skips", 1),
                            ("final_steps_computed", 0), ("order", 0), ("fit_steps", 1)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"CacheConfig.{name} must be an int >= {least}, got {value!r}")
        if self.fit_steps < self.order + 1:
            raise ValueError(f"CacheConfig.fit_steps must be >= order + 1 = {self.order + 1} (a degree-{self.order} "
                             f"fit needs that many computed steps), got {self.fit_steps!r}")  # fmt: skip
        if self.cfg not in CFG_MODES:
            raise ValueError(f"CacheConfig.cfg must be one of {CFG_MODES}, got {self.cfg!r}")


def as_config(cache: Union[None, float, CacheConfig]) -> Optional[CacheConfig]:
    """``patch``'s ``cache`` argument as a CacheConfig (None: no cache; a number: the threshold)."""
    if cache is None or isinstance(cache, CacheConfig):
        return cache
    if isinstance(cache, (int, float)) and not isinstance(cache, bool):
        return CacheConfig(threshold=float(cache))
    raise TypeError(f"cache must be None, a threshold (float) or a dit_kernels.CacheConfig, got {cache!r}")
