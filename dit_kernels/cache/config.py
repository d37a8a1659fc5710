"""``CacheConfig``: the step cache's knobs, checked when made, with the defaults and why."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

CFG_MODES = ("joint", "per_half")


@dataclass(frozen=True)
class CacheConfig:
    """First-Block-Cache style step caching (``dit_kernels.patch(..., cache=CacheConfig(...))``; a float
    ``cache=0.1`` means ``CacheConfig(threshold=0.1)``).

    Each transformer call runs the first ``head_blocks`` blocks; their output residual ``r`` (image
    stream: head output - head input) is compared with the previous step's, ``change = mean|r - r_prev| /
    mean|r_prev|`` (fp32), and the changes are summed since the last computed step (``accumulated``, so
    a slow drift of small steps still forces a recompute). The remaining blocks are skipped, their cached
    residual (both streams on dual-stream models) added to the head output instead, only when
    ``accumulated < threshold`` and no rule below forces a computed step.

    - ``threshold`` (0.08): relative L1 budget of accumulated head-residual change; 0 never skips (the
      output is then exactly the uncached one). 0.05-0.12 is the usual range for trained models
      (First Block Cache / TeaCache report it for FLUX); higher skips more and errs more.
    - ``head_blocks`` (1): blocks always computed; their residual is the change signal. More blocks give a
      better signal and save less.
    - ``warmup_steps`` (2): the first steps of a call are always computed: the latents change fastest
      there and the cache needs a reference.
    - ``max_consecutive_skips`` (3): at most this many skipped steps in a row, bounding how stale a reused
      residual gets (at most 3 of 4 steps skipped).
    - ``final_steps_computed`` (2): the last steps of a call are always computed (they set fine detail);
      applies when the step count is known (a pipeline call, or ``cache_session(num_steps=...)``).
    - ``cfg`` ("joint"): a batched classifier-free-guidance call is decided on the whole batch;
      "per_half" decides the two halves independently (each its own reference, accumulator and cache;
      when only one half computes, the remaining blocks run on that half's sub-batch only). An odd
      batch is one group either way.
    - ``extrapolate`` (False): a skipped step adds the cached residual extrapolated to first order from
      the last two computed steps (``r_k + (r_k - r_j) * (s - k) / (k - j)``) instead of ``r_k``.
    """

    threshold: float = 0.08
    head_blocks: int = 1
    warmup_steps: int = 2
    max_consecutive_skips: int = 3
    final_steps_computed: int = 2
    cfg: str = "joint"
    extrapolate: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TypeError(f"CacheConfig.threshold must be a number, got {self.threshold!r}")
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"CacheConfig.threshold must be finite and >= 0, got {self.threshold!r}")
        for name, least in (("head_blocks", 1), ("warmup_steps", 0), ("max_consecutive_skips", 1),
                            ("final_steps_computed", 0)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"CacheConfig.{name} must be an int >= {least}, got {value!r}")
        if self.cfg not in CFG_MODES:
            raise ValueError(f"CacheConfig.cfg must be one of {CFG_MODES}, got {self.cfg!r}")
        if not isinstance(self.extrapolate, bool):
            raise ValueError(f"CacheConfig.extrapolate must be a bool, got {self.extrapolate!r}")


def as_config(cache: Union[None, float, CacheConfig]) -> Optional[CacheConfig]:
    """``patch``'s ``cache`` argument as a CacheConfig (None: no cache; a number: the threshold)."""
    if cache is None or isinstance(cache, CacheConfig):
        return cache
    if isinstance(cache, (int, float)) and not isinstance(cache, bool):
        return CacheConfig(threshold=float(cache))
    raise TypeError(f"cache must be None, a threshold (float) or a dit_kernels.CacheConfig, got {cache!r}")
