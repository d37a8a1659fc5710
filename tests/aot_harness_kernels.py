"""Tiny Triton kernels for tests/test_aot_harness.py: one config that fits and two that must be flagged.

Not a test module: the test compiles these in a child process without TRITON_INTERPRET
(``python -m dit_kernels.aot --specs aot_harness_kernels:specs``), so that @triton.jit produces real
JIT functions here."""

import triton
import triton.language as tl

from dit_kernels.aot import AotSpec


@triton.jit
def scale_kernel(x_ptr, y_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, (x * alpha).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * N + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))


_MM_SIGNATURE = {
    "a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32",
    "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
}  # fmt: skip
# Sizes divisible by 16, as the launcher specializes them: without it the fp16 loads are not 16-byte
# vectors and Triton does not pipeline them (one stage of shared memory whatever num_stages says).
_MM_ALIGNED = ("a_ptr", "b_ptr", "c_ptr", "M", "N", "K")


def specs():
    return [
        # fits everywhere: 17-19 registers, no shared memory
        AotSpec(
            "clean_scale",
            scale_kernel,
            {"x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i32", "alpha": "fp32", "BLOCK": "constexpr"},
            {"BLOCK": 1024},
        ),
        # 5 stages of 128x128 fp16 A and B tiles: 4-5 x 64 KB of shared memory (256 KB on sm_80,
        # 321 KB on sm_90a), over both limits; the 128x128 accumulator over 256 threads does not spill.
        AotSpec(
            "mm_shared_over_limit",
            matmul_kernel,
            _MM_SIGNATURE,
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128},
            num_warps=8,
            num_stages=5,
            divisible_by_16=_MM_ALIGNED,
        ),
        # 128x256 fp32 accumulator over 128 threads: 256 registers per thread for it alone > 255.
        AotSpec(
            "mm_spills",
            matmul_kernel,
            _MM_SIGNATURE,
            {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 16},
            num_warps=4,
            num_stages=1,
            divisible_by_16=_MM_ALIGNED,
        ),
    ]
