"""Fused ops, one family per file: reference (the spec), Triton kernel, CUDA launcher, dispatch."""

from dit_kernels.ops.norm_modulate import gated_residual, gated_residual_layernorm_modulate, layernorm_modulate

__all__ = ["layernorm_modulate", "gated_residual", "gated_residual_layernorm_modulate", "all_aot_specs"]


def all_aot_specs():
    """Every Triton kernel config of every op family, for the ahead-of-time fit check (dit_kernels.aot)."""
    from dit_kernels.ops import norm_modulate

    return norm_modulate.aot_specs()
