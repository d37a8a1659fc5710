"""Self-test of gate 2 (dit_kernels.aot): a clean Triton kernel passes, a spilling one and one over the
shared-memory limit are flagged, and the CUDA side reads registers/stack/shared of a .so built here.

The Triton compiles run in a child process without TRITON_INTERPRET (conftest sets it for this one)."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dit_kernels import aot

TESTS = Path(__file__).resolve().parent

CUDA_SOURCE = r"""
extern "C" __global__ void clean_kernel(const float* __restrict__ x, float* __restrict__ y, float a, int n) {
  __shared__ float tile[256];
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  tile[threadIdx.x] = i < n ? x[i] : 0.f;
  __syncthreads();
  if (i < n) y[i] = a * tile[255 - threadIdx.x];
}

// 96 live values under a 32-register cap (1024 threads, 2 blocks per SM): spills.
extern "C" __global__ void __launch_bounds__(1024, 2) spilling_kernel(const float* x, float* y, int n) {
  float v[96];
#pragma unroll
  for (int k = 0; k < 96; ++k) v[k] = x[k * n + threadIdx.x];
  float acc = 0.f;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
#pragma unroll
    for (int k = 0; k < 96; ++k) acc += v[k] * v[(k + r + 1) % 96];
#pragma unroll
    for (int k = 0; k < 96; ++k) v[k] = v[k] * acc + 1.0f;
  }
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < 96; ++k) s += v[k];
  y[threadIdx.x] = s;
}

// stores at data-dependent indices: the array lives in local memory (a stack frame, no spill).
extern "C" __global__ void local_array_kernel(const int* idx, const float* x, float* y, int n) {
  float buf[64];
#pragma unroll
  for (int k = 0; k < 64; ++k) buf[k] = 0.f;
  for (int k = 0; k < n; ++k) buf[idx[k * blockDim.x + threadIdx.x] & 63] += x[k * blockDim.x + threadIdx.x];
  y[threadIdx.x] = buf[idx[threadIdx.x] & 63];
}

template <int N>
__global__ void templated_kernel(float* y) { y[threadIdx.x] *= N; }
template __global__ void templated_kernel<3>(float*);
"""


def _nvcc():
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _parse_nvcc_ptxas_log(text):
    """-Xptxas -v output -> {(arch, function): (registers, stack bytes)}."""
    out, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            current = (m.group(2), m.group(1))
        m = re.search(r"(\d+) bytes stack frame", line)
        if m and current:
            stack = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            out[current] = (int(m.group(1)), stack)
            current = None
    return out


@pytest.fixture(scope="module")
def cuda_so(tmp_path_factory):
    """(path of a .so with sm_80 + sm_90a SASS, ptxas -v figures), or None without nvcc."""
    nvcc = _nvcc()
    if nvcc is None:
        return None
    tmp = tmp_path_factory.mktemp("aot_cuda")
    (tmp / "kernels.cu").write_text(CUDA_SOURCE)
    proc = subprocess.run(
        [nvcc, "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
         "-shared", "-Xcompiler", "-fPIC", "-Xptxas", "-v", "-o", str(tmp / "kernels.so"), str(tmp / "kernels.cu")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return tmp / "kernels.so", _parse_nvcc_ptxas_log(proc.stdout + proc.stderr)


def test_refuses_to_compile_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec = aot.AotSpec("anything", kernel=None, signature={}, constexprs={})
    with pytest.raises(aot.AotError, match="TRITON_INTERPRET"):
        aot.compile_triton(spec, 80)
    with pytest.raises(aot.AotError, match="TRITON_INTERPRET"):
        aot.check([spec])


def test_parsers_on_recorded_tool_output():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    704 bytes stack frame, 1428 bytes spill stores, 1712 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 704 bytes cumulative stack size
"""
    assert aot._parse_ptxas_log(log) == {"arch": "sm_90a", "registers": 32, "stack": 704, "stores": 1428, "loads": 1712}
    res = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function clean:
  REG:8 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:376 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    ((arch, name, fields),) = aot._parse_res_usage(res)
    assert (arch, name, fields["REG"], fields["STACK"], fields["SHARED"]) == ("sm_80", "clean", 8, 0, 1024)
    bad = aot.FitResult("k", "sm_80", 255, 4, 4, 8, 0, 166912)
    assert not bad.ok and "spills" in bad.problems[0]
    assert aot.FitResult("k", "sm_90a", 128, 0, 0, 0, 232448, 232448).ok
    assert not aot.FitResult("k", "sm_90a", 128, 0, 0, 0, 232449, 232448).ok


def test_cuda_kernel_resources(cuda_so):
    if cuda_so is None:
        pytest.skip("nvcc not found")
    try:
        aot.find_cuobjdump()
    except aot.AotError as err:
        pytest.skip(str(err))
    path, ptxas = cuda_so
    results = {(r.arch, r.name): r for r in aot.cuda_kernel_resources(path)}
    names = {"clean_kernel", "spilling_kernel", "local_array_kernel"}
    for arch in ("sm_80", "sm_90a"):  # the template instance: demangled when c++filt is there
        assert [n for a, n in results if a == arch and "templated_kernel" in n], results
    assert {key for key in results if "templated_kernel" not in key[1]} == {
        (a, n) for a in ("sm_80", "sm_90a") for n in names
    }
    for arch in ("sm_80", "sm_90a"):
        clean = results[arch, "clean_kernel"]
        assert clean.ok, clean
        assert (clean.spill_stores, clean.stack_bytes) == (0, 0)
        assert clean.shared_bytes >= 1024  # its __shared__ tile (sm_90a adds nvcc's reserved 1 KB)
        assert clean.shared_limit == aot.SHARED_LIMITS[int(arch[3:5])]
        for name in ("spilling_kernel", "local_array_kernel"):
            r = results[arch, name]
            assert not r.ok and r.stack_bytes > 0 and r.spill_stores == -1, r
        # cross-check: cuobjdump on the .so agrees with what ptxas printed while building it
        for name in names:
            assert (results[arch, name].registers, results[arch, name].stack_bytes) == ptxas[arch, name]


def test_triton_fit_check_in_subprocess(tmp_path, cuda_so):
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    out = tmp_path / "fit.json"
    cuda_args = ["--so", str(cuda_so[0])] if cuda_so is not None else ["--no-cuda"]
    proc = aot.run_in_subprocess(
        ["--specs", "aot_harness_kernels:specs", *cuda_args, "--json", str(out), "-j", "2"], env=env, timeout=300
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    results = {(r["name"], r["arch"]): r for r in json.loads(out.read_text())}
    for arch in ("sm_80", "sm_90a"):
        clean = results["clean_scale", arch]
        assert clean["ok"] and clean["error"] == "" and 0 < clean["registers"] < 64, clean
        shared = results["mm_shared_over_limit", arch]
        assert not shared["ok"] and shared["error"] == "", shared
        assert shared["spill_stores"] == 0 and shared["shared_bytes"] > shared["shared_limit"], shared
        spills = results["mm_spills", arch]
        assert not spills["ok"] and spills["error"] == "", spills
        assert spills["spill_stores"] > 0 and spills["stack_bytes"] > 0, spills
        if cuda_so is not None:
            assert results["clean_kernel", arch]["ok"] and not results["spilling_kernel", arch]["ok"]
    assert "FAIL" in proc.stdout and "mm_spills" in proc.stdout

    # only the clean config: exit status 0
    proc = aot.run_in_subprocess(
        ["--specs", "aot_harness_kernels:specs", "-k", "clean", "--no-cuda", "-j", "1"], env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " 0 failing" in proc.stdout
