"""``CacheConfig``: the step cache's knobs, checked when made, with the defaults and why."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

CFG_MODES = ("joint", "per_half")


@dataclass(frozen=True)
class CacheConfig:
    """First-Block-Cache style step caching with predicted residuals (``dit_kernels.patch(..., cache=
    CacheConfig(...))``; a float ``cache=0.2`` means ``CacheConfig(threshold=0.2)``).

    Each transformer call runs the first ``head_blocks`` blocks. On a computed step the remaining blocks
    run too and their residual (output - head output, per stream) is kept with the head residual (head
    output - head input, image stream): these computed steps are the nodes. On a skipped
    step the remaining blocks are not run: their residual is predicted from the last ``fit_steps`` nodes by
    the polynomial of degree ``order`` through them (TaylorSeer's finite differences, on uneven steps)
    and added to the head output. The head residual, computed every step, is predicted from the same
    nodes with the same weights, and its miss ``change = mean|predicted - h| / mean|h|`` (fp32) is the
    signal: it is summed over the skip run (``accumulated``), and a step computes when the sum reaches
    ``threshold`` or a rule below forces it (``dit_kernels.cache.policy``).

    - ``threshold`` (0.2): the error budget of a skip run, in relative L1 of the predicted head residual;
      0 never skips (the output is then exactly the uncached one). Chosen from the quality-vs-cost curves
      of ``python -m dit_kernels.bench.trained --sweep`` (README): the largest budget keeping the trained
      DiT's final images near 40 dB of the uncached ones without guidance.
    - ``order`` (1): degree of the residual prediction. 0 reuses the last computed residual (First Block
      Cache), 1 extrapolates linearly from the last two computed steps, 2 quadratically from three. On the
      trained models 1 was best: the residuals carry step-to-step jitter from the timestep embedding, which
      higher orders amplify; the change signal uses the same order, so a worse prediction costs computed
      steps, not quality.
    - ``fit_steps`` (2): computed steps the prediction is fit to (>= ``order + 1``); more than ``order + 1``
      fits by least squares, smoothing the jitter. On the trained DiT 3 or 4 (order 1) lost 2-3 dB at
      equal cost against 2, so the default interpolates.
    - ``head_blocks`` (1): blocks always computed; their residual is the change signal. More blocks give a
      better signal and save less.
    - ``warmup_steps`` (2): the first steps of a call are always computed: the latents change fastest
      there and the prediction needs two nodes.
    - ``max_consecutive_skips`` (8): a safety bound on a skip run; the budget ends runs first on the trained
      models (the v1 fixed cap of 3 bounded the saving at ~2.6x whatever the signal said).
    - ``final_steps_computed`` (2): the last steps of a call are always computed (they set fine detail);
      applies when the step count is known (a pipeline call, or ``cache_session(num_steps=...)``).
    - ``cfg`` ("joint"): a batched classifier-free-guidance call is decided on the whole batch;
      "per_half" decides the two halves independently (each its own nodes, accumulator and skip run;
      when only one half computes, the remaining blocks run on that half's sub-batch only). An odd
      batch is one group either way.
    """

    threshold: float = 0.2
    head_blocks: int = 1
    warmup_steps: int = 2
    max_consecutive_skips: int = 8
    final_steps_computed: int = 2
    cfg: str = "joint"
    order: int = 1
    fit_steps: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TypeError(f"CacheConfig.threshold must be a number, got {self.threshold!r}")
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"CacheConfig.threshold must be finite and >= 0, got {self.threshold!r}")
        for name, least in (("head_blocks", 1), ("warmup_steps", 0), ("max_consecutive_skips", 1),
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
