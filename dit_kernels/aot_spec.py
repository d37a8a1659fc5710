"""``AotSpec``: one Triton kernel configuration to compile ahead of time (gate 2, ``dit_kernels.aot``).

A leaf module: the op families (``dit_kernels.ops``) declare their specs with it, and ``dit_kernels.aot``
imports the ops to collect them; neither imports the other through this file."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AotSpec:
    """One Triton kernel configuration to compile ahead of time.

    ``signature`` names every parameter of ``kernel`` in order, with a Triton type string ("*bf16",
    "*fp32", "i32", "i64", "fp32", ...) or "constexpr"; ``constexprs`` gives the value of every
    "constexpr" parameter that has no default in the kernel. ``divisible_by_16`` names the parameters
    Triton may assume are multiples of 16 (pointers: 16-byte aligned; integers: strides and sizes), as
    its launcher specializes them at launch for aligned tensors and sizes; None means every pointer
    parameter (torch allocations are aligned) and no integer. ``vector_io``: the compiled kernel must
    move every global load and store as a vector (``ld.global.v2/.v4``, ``st.global.v2/.v4``): the
    config stands for aligned shapes, where a scalar access is a regression. ``representative``: in the
    small set the default test run compiles (the model shapes); the rest is checked by the slow test.
    """

    name: str
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple | None = None
    vector_io: bool = False
    representative: bool = False

    @classmethod
    def build(cls, name, kernel, runtime_signature, constexprs, **launch):
        """Spec whose signature is ``runtime_signature`` followed by every key of ``constexprs``."""
        signature = runtime_signature | {key: "constexpr" for key in constexprs}
        return cls(name=name, kernel=kernel, signature=signature, constexprs=constexprs, **launch)
