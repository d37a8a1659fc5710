"""Microbenchmarks (pytest-benchmark): `pytest benchmarks/ --benchmark-only`. Each benchmark records the
device it ran on; GPU runs also record achieved GB/s against the fused kernel's byte floor."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
