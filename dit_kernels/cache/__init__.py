"""Step cache: skipped denoising steps return the transformer output extrapolated from computed steps,
with the interval between computed steps under error control (no KV cache).

``config``: CacheConfig and its checks. ``policy``: the skip rule, per-group state, stats.
``step_cache``: the wrappers and per-call state. Which blocks a model has is its family's
``BlockLayout`` (``dit_kernels.patching``), handed in by ``patch``."""

from dit_kernels.cache.config import CacheConfig, as_config
from dit_kernels.cache.step_cache import StepCache, validate

__all__ = ["CacheConfig", "StepCache", "as_config", "validate"]
