"""The CPU emulation of CUDA (csrc/cpu_emulation/cuda_emulation.h), the portable kernel header
(csrc/include/dit_kernels/portable.h) that lets one kernel body compile under nvcc and g++, and the two
access paths of the kernels built on it (csrc/include/dit_kernels/row_team.cuh).

- selftest.cpp, built with g++ and run: block reductions with warp shuffles and static shared memory,
  dynamic shared memory, a partial warp, 16-byte packs (a misaligned one fails the launch, as it faults
  on a GPU), bit-exact bf16/half rounding, and divergent barriers / kernel exceptions that must fail the
  launch cleanly instead of hanging.
- A small kernel using every part of portable.h, compiled by nvcc for sm_90a (no GPU needed) and by g++,
  so the header stays clean under both compilers.
- The norm_modulate and qk_norm_rope kernels through dit_kernels._C_cpu: each launch picks the 16-byte
  vector path only when every pointer and stride is 16-byte aligned (the launch returns the bytes per
  access it used), the scalar fallback otherwise, and both give the same bits (every thread handles the
  same elements in the same order on both paths) within the reference's tolerance."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from tolerances import assert_same_math

from dit_kernels import backends
from dit_kernels.ops import gated_residual, gated_residual_layernorm_modulate, qk_norm_rope

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


# ------------------------------------------------------------------ the kernels' vector and scalar paths

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A dense copy of t that starts one element past a 16-byte boundary (the allocator aligns to 64)."""
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buffer[1:].view(t.shape)
    out.copy_(t)
    return out


def _address(t) -> int:
    return 0 if t is None else t.data_ptr()


def _row_operand(t) -> tuple:
    """(address, stride_b, stride_s) of a [B, S, D] or [B, D] operand (0, 0, 0 when absent)."""
    if t is None:
        return 0, 0, 0
    return t.data_ptr(), t.stride(0), t.stride(1) if t.dim() == 3 else 0


def launch_norm_modulate(x, y=None, gate=None, shift=None, scale=None, weight=None, bias=None, *,
                         out=None, h_out=None, normalize=True):  # fmt: skip
    """One _C_cpu launch into out / h_out (fresh when not given); returns (bytes per access, out, h_out)."""
    batch, seq, dim = x.shape
    out = torch.empty_like(x) if normalize and out is None else out
    h_out = torch.empty_like(x) if y is not None and h_out is None else h_out
    access = backends.emulation_module().norm_modulate(
        str(x.dtype).removeprefix("torch."), batch * seq, seq, dim, _address(out), _address(h_out),
        *(_row_operand(t) for t in (x, y, gate, shift, scale)), _address(weight), _address(bias), 1e-6, normalize, 0,
    )  # fmt: skip
    return access, out, h_out


def norm_inputs(dtype, dim, *, batch=2, seq=7):
    gen = torch.Generator().manual_seed(dim)
    randn = lambda *shape, s=1.0: (torch.randn(*shape, generator=gen) * s).to(dtype)  # noqa: E731
    return {
        "x": randn(batch, seq, dim) + 0.3, "y": randn(batch, seq, dim), "gate": randn(batch, dim, s=0.5),
        "shift": randn(batch, dim, s=0.5), "scale": randn(batch, dim, s=0.5),
        "weight": randn(dim, s=0.1) + 1.0, "bias": randn(dim, s=0.1),
    }  # fmt: skip


# D: sub-warp teams (64: 4 threads a row, 64 rows a block), cross-warp teams with barriers (1152: 64
# threads; 3072: 128), and teams that leave rows of the last grid-stride pass empty (2 x 7 rows).
@pytest.mark.parametrize("dim", [64, 1152, 3072])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_modulate_paths_agree_and_match_reference(dtype, dim):
    t = norm_inputs(dtype, dim)
    access, out, h = launch_norm_modulate(**t)
    assert access == 16
    h_ref, out_ref = gated_residual_layernorm_modulate(*t.values(), backend="torch")
    assert_same_math(h, h_ref, what=f"h {dtype} D={dim}")
    assert_same_math(out, out_ref, what=f"out {dtype} D={dim}")
    scalar, out_s, h_s = launch_norm_modulate(**{name: misaligned(v) for name, v in t.items()})
    assert scalar == dtype.itemsize
    assert torch.equal(out_s, out) and torch.equal(h_s, h)


@pytest.mark.parametrize("operand", ["x", "y", "gate", "shift", "scale", "weight", "bias", "out", "h_out"])
def test_norm_modulate_takes_the_vector_path_only_when_every_operand_is_aligned(operand):
    t = norm_inputs(torch.bfloat16, 64)
    _, out, h = launch_norm_modulate(**t)
    if operand in ("out", "h_out"):
        moved = {**t, operand: misaligned(torch.empty_like(t["x"]))}
    else:
        moved = {**t, operand: misaligned(t[operand])}
    access, out_s, h_s = launch_norm_modulate(**moved)
    assert access == 2, f"misaligned {operand} must select the scalar path"
    assert torch.equal(out_s, out) and torch.equal(h_s, h)
    strided = {**t, "shift": torch.cat([t["shift"], t["shift"][:, :4]], dim=1)[:, :64]}  # row stride 68: 136 bytes
    assert launch_norm_modulate(**strided)[0] == 2


def test_norm_modulate_scalar_path_for_any_width_and_the_largest_rows():
    """D = 100 (not a multiple of 8: partial chunks, scalar even when aligned); D = 12288 (the largest
    normalised row: 512 threads a row); a residual alone of D = 20000 (more chunks than one pass holds)."""
    t = norm_inputs(torch.bfloat16, 100)
    access, out, h = launch_norm_modulate(**t)
    assert access == 2
    h_ref, out_ref = gated_residual_layernorm_modulate(*t.values(), backend="torch")
    assert_same_math(out, out_ref, what="D=100")
    assert_same_math(h, h_ref, what="h D=100")
    t = norm_inputs(torch.bfloat16, 12288, batch=1, seq=3)
    access, out, _ = launch_norm_modulate(**t)
    assert access == 16
    assert_same_math(out, gated_residual_layernorm_modulate(*t.values(), backend="torch")[1], what="D=12288")
    t = norm_inputs(torch.bfloat16, 20000, batch=1, seq=2)
    for inputs, want in ((t, 16), ({k: misaligned(v) for k, v in t.items()}, 2)):
        access, out, h = launch_norm_modulate(inputs["x"], inputs["y"], inputs["gate"], normalize=False)
        assert access == want and out is None
        assert_same_math(h, gated_residual(t["x"], t["y"], t["gate"], backend="torch"), what="residual D=20000")


def _qk_slot(src, dst, weight, bias, *, normalize=True, rotate=True) -> tuple:
    return (src.data_ptr(), *src.stride()[:3], src.shape[1], dst.data_ptr(), *dst.stride()[:3],
            _address(weight), _address(bias), normalize, rotate)  # fmt: skip


def launch_qk_norm_rope(q, k, v, weight, bias, cos, sin, *, norm, rope, offset, dests=None):
    """One _C_cpu launch (q and k normalised with weight/bias and rotated, v copied) into `dests` (fresh
    when not given); returns (bytes per access, [q_out, k_out, v_out])."""
    batch, _, heads, dim = q.shape
    dests = dests or [torch.empty_like(t) for t in (q, k, v)]
    access = backends.emulation_module().qk_norm_rope(
        str(q.dtype).removeprefix("torch."), batch, heads, dim,
        _qk_slot(q, dests[0], weight, bias), _qk_slot(k, dests[1], weight, bias),
        _qk_slot(v, dests[2], None, None, normalize=False, rotate=False),
        {"rms": 1, "layer": 2}[norm], 1e-6, cos.data_ptr(), sin.data_ptr(), offset, cos.stride(0), rope == "half",
        False, 0,  # across_heads, stream
    )  # fmt: skip
    return access, dests


def qk_inputs(dtype, dim, *, rows=16):
    gen = torch.Generator().manual_seed(dim)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    q, k, v = ((randn(2, seq, 3, dim) + 0.3).to(dtype) for seq in (3, 5, 5))
    angles = randn(rows, dim)
    return {"q": q, "k": k, "v": v, "weight": (1.0 + 0.1 * randn(dim)).to(dtype), "bias": (0.1 * randn(dim)).to(dtype),
            "cos": angles.cos(), "sin": angles.sin()}  # fmt: skip


def qk_reference(t, *, norm, rope, offset):
    return qk_norm_rope(t["q"], t["k"], v=t["v"], norm=norm, q_weight=t["weight"], k_weight=t["weight"],
                        q_bias=t["bias"], k_bias=t["bias"], cos=t["cos"], sin=t["sin"], rope=rope,
                        seq_offset=offset, backend="torch")  # fmt: skip


# Head dims: SD3 (64: 4 lanes a row), DiT/PixArt (72) and HunyuanDiT (88: 9 / 11 chunks over 8 lanes),
# FLUX (128); the half layout's partner lives in another lane's chunk (staged in shared memory).
@pytest.mark.parametrize("dim", [64, 72, 88, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qk_norm_rope_paths_agree_and_match_reference(dtype, dim):
    t = qk_inputs(dtype, dim)
    for norm, rope in (("rms", "interleaved"), ("layer", "half")):
        access, outs = launch_qk_norm_rope(*t.values(), norm=norm, rope=rope, offset=4)
        assert access == 16
        for actual, expected, name in zip(outs, qk_reference(t, norm=norm, rope=rope, offset=4), "qkv"):
            assert_same_math(actual, expected, what=f"{name} {dtype} Dh={dim} {norm} {rope}")
        scalar, outs_s = launch_qk_norm_rope(*(misaligned(x) for x in t.values()), norm=norm, rope=rope, offset=4)
        assert scalar == dtype.itemsize
        assert all(torch.equal(a, b) for a, b in zip(outs_s, outs))


@pytest.mark.parametrize("operand", ["q", "k", "v", "weight", "bias", "cos", "sin", "dest"])
def test_qk_norm_rope_takes_the_vector_path_only_when_every_operand_is_aligned(operand):
    t = qk_inputs(torch.bfloat16, 88)
    _, outs = launch_qk_norm_rope(*t.values(), norm="layer", rope="half", offset=1)
    dests = [misaligned(torch.empty_like(x)) for x in (t["q"], t["k"], t["v"])] if operand == "dest" else None
    moved = t if operand == "dest" else {**t, operand: misaligned(t[operand])}
    access, outs_s = launch_qk_norm_rope(*moved.values(), norm="layer", rope="half", offset=1, dests=dests)
    assert access == 2, f"misaligned {operand} must select the scalar path"
    assert all(torch.equal(a, b) for a, b in zip(outs_s, outs))


def test_qk_norm_rope_partial_chunks_and_broadcast_table():
    """Dh = 36 (bf16: 4 full chunks and a half one, scalar path; the half layout's partner crosses the
    partial chunk), and a one-row table broadcast over the sequence (row stride 0) on the vector path."""
    t = qk_inputs(torch.bfloat16, 36)
    access, outs = launch_qk_norm_rope(*t.values(), norm="layer", rope="half", offset=2)
    assert access == 2
    for actual, expected in zip(outs, qk_reference(t, norm="layer", rope="half", offset=2)):
        assert_same_math(actual, expected, what="Dh=36")
    t = qk_inputs(torch.bfloat16, 64, rows=1)
    t["cos"], t["sin"] = t["cos"].expand(8, -1), t["sin"].expand(8, -1)  # stride 0: one row for every s
    access, outs = launch_qk_norm_rope(*t.values(), norm="rms", rope="interleaved", offset=0)
    assert access == 16
    for actual, expected in zip(outs, qk_reference(t, norm="rms", rope="interleaved", offset=0)):
        assert_same_math(actual, expected, what="one-row table")
