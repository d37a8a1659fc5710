"""Error bounds shared by the parity tests, each with its reason.

Two kinds of comparison:

1. *Same math* (a kernel vs the torch reference, both computing in fp32 and rounding once to the output
   dtype): the results may differ by the fp32 reduction order and FMA contraction, which can flip the
   final rounding: at most ``ulps`` units in the last place of the output dtype, relative to the value's
   magnitude plus 1 (inputs are O(1), so cancellation near 0 leaves an absolute error of that size).
   Triton's interpreter truncates fp32 -> bf16 instead of rounding to nearest (GPU_LESS.md §1), a second
   ulp; a normalisation that reads a truncated intermediate can amplify it, hence 2-3 ulps there.
2. *Against an fp32 truth* (the flash-attention rule): a low-precision result may err at most ``factor``
   times what eager diffusers' own low-precision computation errs, plus a small absolute floor per dtype
   (eager can be exact by luck on small tensors).
"""

import torch

EPS = {dtype: torch.finfo(dtype).eps for dtype in (torch.float32, torch.float16, torch.bfloat16)}

# Absolute floor of the eager bound: a quarter ulp at magnitude 1 in each dtype.
EAGER_FLOOR = {dtype: eps / 4 for dtype, eps in EPS.items()}


def assert_same_math(actual: torch.Tensor, expected: torch.Tensor, *, ulps: float = 1.0, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.double(), expected.double()
    # fp32 results carry fp32 reduction-order noise: a few fp32 ulps of the row's scale.
    ulps = max(ulps, 8.0) if actual.dtype == torch.float32 else ulps
    tolerance = ulps * EPS[actual.dtype] * (e.abs() + 1.0)
    excess = (a - e).abs() - tolerance
    worst = int(excess.argmax()) if excess.numel() else 0
    assert excess.numel() == 0 or excess.max() <= 0, (
        f"{what}: max error {(a - e).abs().max().item():.3g} over {ulps} ulp(s) of {actual.dtype} "
        f"(at flat index {worst}: got {a.flatten()[worst].item()}, expected {e.flatten()[worst].item()})"
    )


def assert_within_eager_bound(
    actual: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor, *, factor: float = 2.0, what: str = ""
) -> None:
    """max|actual - truth| <= factor * max|eager - truth| + floor(dtype)."""
    ours = (actual.double() - truth.double()).abs().max().item()
    theirs = (eager.double() - truth.double()).abs().max().item()
    bound = factor * theirs + EAGER_FLOOR[actual.dtype]
    assert ours <= bound, f"{what}: error {ours:.3g} vs fp32 truth exceeds {factor} x eager's {theirs:.3g} + floor"
