"""dit_kernels: fused GPU kernels for Diffusion Transformer inference.

``dit_kernels.patch(pipe)`` swaps the fused ops into a diffusers pipeline's transformer;
``dit_kernels.unpatch(pipe)`` restores it exactly; ``dit_kernels.enable_parallelism(pipe, ulysses_degree=N)``
shards its sequence over the ranks of torch.distributed (before or after ``patch``)."""

from dit_kernels import backends, ops
from dit_kernels.api import (
    PatchReport,
    cache_session,
    cache_stats,
    is_patched,
    patch,
    patch_report,
    reset_cache,
    unpatch,
)
from dit_kernels.cache import CacheConfig
from dit_kernels.parallel.enable import disable_parallelism, enable_parallelism

__version__ = "0.1.0"

__all__ = ["patch", "unpatch", "is_patched", "patch_report", "PatchReport", "CacheConfig", "cache_stats",
           "reset_cache", "cache_session", "enable_parallelism", "disable_parallelism", "backends", "ops",
           "__version__"]
