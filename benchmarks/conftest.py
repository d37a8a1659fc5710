"""Microbenchmarks (pytest-benchmark): `pytest benchmarks/ --benchmark-only`. Each benchmark records the
device it ran on; GPU runs also record achieved GB/s against the fused kernel's byte floor."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest
import torch

from dit_kernels.bench.ops import H100_HBM_BYTES_PER_S

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Timer:
    """Benchmarks callables on this machine's device and reports achieved bandwidth."""

    def __init__(self, benchmark):
        self.benchmark = benchmark

    def __call__(self, fn, gpu_rounds: int, cpu_rounds: int, warmup_rounds: int = 2) -> float:
        """Time ``fn`` (GPU synchronised after every call), record the device, return the median seconds."""
        on_gpu = DEVICE.type == "cuda"
        self.benchmark.extra_info["device"] = torch.cuda.get_device_name() if on_gpu else "cpu"
        call = (lambda: (fn(), torch.cuda.synchronize())) if on_gpu else fn
        self.benchmark.pedantic(call, rounds=gpu_rounds if on_gpu else cpu_rounds, warmup_rounds=warmup_rounds)
        return self.benchmark.stats.stats.median

    def report_bandwidth(self, label: str, moved_bytes: int, seconds: float) -> None:
        """Record and print GB/s for ``moved_bytes`` in ``seconds`` next to the H100 HBM3 floor (3.35 TB/s)."""
        floor_us = moved_bytes / H100_HBM_BYTES_PER_S * 1e6
        self.benchmark.extra_info |= {"GB/s": moved_bytes / seconds / 1e9, "floor_us": floor_us}
        print(f"\n{label}: {moved_bytes / seconds / 1e9:.0f} GB/s, {seconds * 1e6:.1f} us vs {floor_us:.1f} us floor")


@pytest.fixture
def timed(benchmark) -> Timer:
    return Timer(benchmark)
