"""dit_kernels: fused GPU kernels for Diffusion Transformer inference.

``dit_kernels.patch(pipe)`` swaps the fused ops into a diffusers pipeline's transformer;
``dit_kernels.unpatch(pipe)`` restores it exactly."""

from dit_kernels import backends, ops
from dit_kernels.api import PatchReport, is_patched, patch, patch_report, unpatch

__version__ = "0.1.0"

__all__ = ["patch", "unpatch", "is_patched", "patch_report", "PatchReport", "backends", "ops", "__version__"]
