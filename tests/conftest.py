"""Test setup. TRITON_INTERPRET must be set before anything imports triton-decorated kernels, so it is
decided here, before any dit_kernels import: on a machine without CUDA the Triton kernels run in the
interpreter on CPU tensors (gate 1); with CUDA they run on the GPU and the GPU-marked tests take over."""

import os

# One intra-op thread (torch's OpenMP pool, BLAS; inherited by the AOT and torchrun child processes): the
# tests' tensors are tiny, so a second thread saves nothing, and on a busy machine spinning threads make
# each call several times slower (tests/test_model_pixart.py on a loaded 2-core machine: 127 s wall and 50 s
# CPU with 2 threads, 77 s and 31 s with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dit_kernels  # noqa: E402,F401  (imported after the variable is settled)
from dit_kernels import backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def pytest_report_header(config):
    return [f"dit_kernels backends: {a.name}={'yes' if a.available else 'no'}" for a in backends.report().values()]
