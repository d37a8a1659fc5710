"""Microbenchmarks (pytest-benchmark): `pytest benchmarks/ --benchmark-only -s`.

On a GPU every op is timed by ``triton.testing.do_bench``: the L2 cache flushed before each call (it
zeroes a buffer larger than L2), ~100 ms of calls after a warm-up, the median kept; GB/s and TFLOP/s are
reported against this device's roofline (``ROOFLINES``) in ``benchmark.extra_info`` and on stdout.
(pytest-benchmark's own table then shows one synchronised call per test: read the extra info.) On CPU
pytest-benchmark times the calls itself."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Roofline:
    """Peak DRAM bandwidth and dense bf16 tensor-core throughput of one GPU (vendor data sheets)."""

    bytes_per_s: float
    bf16_flops: float


# Matched against torch.cuda.get_device_name(), first hit wins (so "H100 PCIe" before "H100").
ROOFLINES = {
    "H200": Roofline(4.8e12, 989e12),
    "H100 PCIe": Roofline(2.0e12, 756e12),
    "H100": Roofline(3.35e12, 989e12),  # SXM, HBM3
    "GH200": Roofline(4.0e12, 989e12),
    "B200": Roofline(8.0e12, 2250e12),
    "A100-SXM4-80GB": Roofline(2.04e12, 312e12),
    "A100": Roofline(1.555e12, 312e12),  # 40 GB
    "L40S": Roofline(0.864e12, 362e12),
    "L4": Roofline(0.3e12, 121e12),
    "RTX 4090": Roofline(1.008e12, 165e12),
}


def device_roofline(name: str) -> Optional[Roofline]:
    return next((roofline for key, roofline in ROOFLINES.items() if key in name), None)


class Timer:
    """Times callables on this machine's device and reports achieved bandwidth / throughput."""

    def __init__(self, benchmark):
        self.benchmark = benchmark
        on_gpu = DEVICE.type == "cuda"
        self.device = torch.cuda.get_device_name() if on_gpu else "cpu"
        self.roofline = device_roofline(self.device) if on_gpu else None
        self.benchmark.extra_info["device"] = self.device

    def __call__(self, fn, cpu_rounds: int, warmup_rounds: int = 2) -> float:
        """The median seconds of one call of ``fn``: ``triton.testing.do_bench`` on a GPU (L2 flushed per
        call, many calls), pytest-benchmark rounds on CPU."""
        if DEVICE.type != "cuda":
            self.benchmark.pedantic(fn, rounds=cpu_rounds, warmup_rounds=warmup_rounds)
            stats = self.benchmark.stats  # None under --benchmark-disable (one untimed call)
            return stats.stats.median if stats is not None else float("nan")
        import triton.testing

        seconds = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        self.benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=1, warmup_rounds=0)
        self.benchmark.extra_info["median_us (do_bench, L2 flushed)"] = seconds * 1e6
        return seconds

    def report_bandwidth(self, label: str, moved_bytes: int, seconds: float) -> None:
        """Record and print GB/s for ``moved_bytes`` in ``seconds``, and the share of the device's peak."""
        rate = moved_bytes / seconds
        self.benchmark.extra_info["GB/s"] = rate / 1e9
        line = f"\n{label}: {seconds * 1e6:.1f} us, {rate / 1e9:.0f} GB/s"
        if self.roofline:
            floor_us = moved_bytes / self.roofline.bytes_per_s * 1e6
            self.benchmark.extra_info |= {"floor_us": floor_us, "of peak bandwidth": rate / self.roofline.bytes_per_s}
            line += f" = {rate / self.roofline.bytes_per_s:.0%} of {self.device}'s peak (floor {floor_us:.1f} us)"
        print(line)

    def report_flops(self, label: str, flops: int, seconds: float) -> None:
        """Record and print TFLOP/s for ``flops`` useful operations, and the share of the bf16 dense peak."""
        rate = flops / seconds
        self.benchmark.extra_info["TFLOP/s"] = rate / 1e12
        line = f"\n{label}: {seconds * 1e3:.3f} ms, {rate / 1e12:.3g} TFLOP/s"
        if self.roofline:
            self.benchmark.extra_info["of bf16 dense peak"] = rate / self.roofline.bf16_flops
            line += f" = {rate / self.roofline.bf16_flops:.0%} of {self.device}'s bf16 dense peak"
        print(line)


@pytest.fixture
def timed(benchmark) -> Timer:
    return Timer(benchmark)
