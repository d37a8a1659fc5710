"""Fused ops, one family per file, each with the same parts (``dit_kernels.ops.dispatch``): reference (the
spec), Triton kernel(s), launcher table, custom ops, AOT specs."""

from dit_kernels.ops.attention import attention_backend, joint_attention, to_heads_first, to_seq_first
from dit_kernels.ops.norm_modulate import gated_residual, gated_residual_layernorm_modulate, layernorm_modulate
from dit_kernels.ops.qk_norm_rope import qk_norm_rope, rope_tables

__all__ = ["layernorm_modulate", "gated_residual", "gated_residual_layernorm_modulate", "qk_norm_rope",
           "rope_tables", "joint_attention", "attention_backend", "to_heads_first", "to_seq_first", "all_aot_specs"]


def all_aot_specs():
    """Every Triton kernel config of every op family, for the ahead-of-time fit check (dit_kernels.aot)."""
    import importlib

    # by module path: `from dit_kernels.ops import qk_norm_rope` would give the function imported above
    families = ("norm_modulate", "qk_norm_rope", "attention")
    return [spec for name in families for spec in importlib.import_module(f"dit_kernels.ops.{name}").aot_specs()]
