"""The CPU emulation of CUDA (csrc/cpu_emulation/cuda_emulation.h) and the portable kernel header
(csrc/include/dit_kernels/portable.h) that lets one kernel body compile under nvcc and g++.

- selftest.cpp, built with g++ and run: block reductions with warp shuffles and static shared memory,
  dynamic shared memory, a partial warp, bit-exact bf16/half rounding, and divergent barriers / kernel
  exceptions that must fail the launch cleanly instead of hanging.
- A small kernel using every part of portable.h, compiled by nvcc for sm_90a (no GPU needed) and by g++,
  so the header stays clean under both compilers."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = ROOT / "csrc" / "include"
SELFTEST = ROOT / "csrc" / "cpu_emulation" / "selftest.cpp"
PORTABLE = INCLUDE / "dit_kernels" / "portable.h"

PROBE = r"""
#include "dit_kernels/portable.h"

template <class T>
DK_GLOBAL void probe_kernel(const T* in, T* out, float* sums) {
  DK_SHARED float partial[32];
  DK_DYNAMIC_SMEM(float, dyn);
  const unsigned i = threadIdx.x + blockIdx.x * blockDim.x;
  const float v = dk::to_float(in[i]);
  dyn[threadIdx.x] = v;
  const float s = dk::warp_sum(v), m = dk::warp_max(v);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) sums[blockIdx.x] = partial[0] + m + float(gridDim.x);
  out[i] = dk::from_float<T>(dyn[threadIdx.x] * dk::rsqrt(v * v + 1.f));
  if constexpr (sizeof(T) == 2) {
    if (threadIdx.x == 1) out[i] = dk::from_bits<T>(dk::to_bits(out[i]));
  }
}

template <class T>
DK_GLOBAL void probe_other_smem_type(const float* in, float* out) {
  DK_DYNAMIC_SMEM(double, dyn);  // a second view of the same dynamic shared memory symbol
  dyn[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = float(dyn[threadIdx.x]) + __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

template DK_GLOBAL void probe_kernel<float>(const float*, float*, float*);
template DK_GLOBAL void probe_kernel<dk::bf16>(const dk::bf16*, dk::bf16*, float*);
template DK_GLOBAL void probe_kernel<dk::half>(const dk::half*, dk::half*, float*);
template DK_GLOBAL void probe_other_smem_type<int>(const float*, float*);
"""


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _gxx():
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    return gxx


def _run(cmd, timeout):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)


def test_emulation_selftest(tmp_path):
    exe = tmp_path / "selftest"
    build = _run([_gxx(), "-std=c++20", "-O1", "-pthread", "-I", INCLUDE, SELFTEST, "-o", exe], timeout=300)
    assert build.returncode == 0, build.stderr[-6000:]
    result = _run([exe], timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "0 failed" in result.stdout, result.stdout[-6000:]


def test_portable_header_compiles_with_gxx(tmp_path):
    src = tmp_path / "probe.cpp"
    src.write_text(PROBE)
    build = _run([_gxx(), "-std=c++20", "-pthread", "-Wall", "-Wextra", "-I", INCLUDE, "-c", src, "-o",
                  tmp_path / "probe.o"], timeout=300)
    assert build.returncode == 0, build.stderr[-6000:]
    assert "portable.h" not in build.stderr and "cuda_emulation.h" not in build.stderr, build.stderr[-6000:]


def test_portable_header_compiles_with_nvcc(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    src = tmp_path / "probe.cu"
    src.write_text(PROBE)
    build = _run([nvcc, "-std=c++20", "-arch=sm_90a", "-Xcompiler", "-Wall,-Wextra", "-I", INCLUDE, "-c", src,
                  "-o", tmp_path / "probe.o"], timeout=600)
    assert build.returncode == 0, build.stderr[-6000:]
    assert "portable.h" not in build.stderr, build.stderr[-6000:]  # no warning from our header
    assert (tmp_path / "probe.o").stat().st_size > 0
