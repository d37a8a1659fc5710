"""The norm/modulate family at real model shapes: eager (diffusers' aten chain) vs each fused backend.

On a GPU: Triton and CUDA (_C) kernels, timed by do_bench with L2 flushed (conftest.py), with GB/s against
the minimum bytes each fused kernel must move (every input read once, every output written once) and the
device's peak bandwidth (e.g. LN+modulate on [1, 4096, 3072] bf16 moves ~50 MB: ~15 us at 3.35 TB/s). On
CPU: the torch reference (the kernels themselves need a GPU; their CPU forms are test vehicles, not timed)."""

import pytest
import torch

from dit_kernels import backends
from dit_kernels.bench.ops import cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16
PATHS = ["eager", "triton", "cuda"] if DEVICE.type == "cuda" else ["eager", "torch"]
CASES = cases() if DEVICE.type == "cuda" else cases(["DiT-XL/2 256px", "FLUX.1 1024px"])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.name}-{c.model.replace(' ', '_')}")
def test_norm_modulate(benchmark, timed, case, path):
    if path != "eager" and not _available(path):
        pytest.skip(f"{path} backend unavailable here")
    tensors = case.inputs(DTYPE, DEVICE)
    fn = (lambda: case.eager(**tensors)) if path == "eager" else (lambda: case.fused(**tensors, backend=path))
    fn()  # warm-up: compiles Triton kernels before timing
    benchmark.group = f"{case.name} {case.model} {'x'.join(map(str, case.shape))}"
    seconds = timed(fn, cpu_rounds=5)
    if DEVICE.type == "cuda" and path != "eager":
        timed.report_bandwidth(f"{benchmark.group} [{path}]", case.min_bytes(DTYPE), seconds)


def _available(path: str) -> bool:
    try:
        backends.resolve(path, DEVICE)
    except RuntimeError:
        return False
    return True
