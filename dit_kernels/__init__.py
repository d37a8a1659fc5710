"""dit_kernels: fused GPU kernels for Diffusion Transformer inference."""

from dit_kernels import backends, ops

__version__ = "0.1.0"

__all__ = ["backends", "ops", "__version__"]
