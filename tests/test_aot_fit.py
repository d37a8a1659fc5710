"""Gate 2 on the project's own kernels: every Triton config the launchers can pick, and every CUDA kernel
built into dit_kernels._C, compiled for sm_80 and sm_90a with no spill, no stack, shared memory within the
architecture's limit, and, where the spec stands for aligned shapes (the launch specializes pointers,
strides and sizes to multiples of 16), only vector global loads and stores in the PTX.

Runs `python -m dit_kernels.aot` in a child process (no interpreter). The default run compiles the
representative specs (the model shapes: `--subset representative`); the slow test compiles the rest, so
`pytest` (CI) checks every spec once and `pytest -m "not slow"` stays quick."""

import importlib
import json

import pytest

from dit_kernels import aot, backends
from dit_kernels.ops import all_aot_specs

# by module path: `from dit_kernels.ops import qk_norm_rope` is the op
norm_modulate = importlib.import_module("dit_kernels.ops.norm_modulate")
qk_norm_rope = importlib.import_module("dit_kernels.ops.qk_norm_rope")

# Instantiations of each CUDA kernel built into _C, per architecture.
CUDA_KERNELS_PER_ARCH = {
    "norm_modulate_kernel": 6,  # <{float, half, bf16}, VECTOR {false, true}>
    "qk_norm_rope_kernel": 6,  # <{float, half, bf16}, VECTOR {false, true}>
    "qk_norm_rope_across_kernel": 3,  # <{float, half, bf16}>
}
VECTOR_FAMILIES = ("norm_modulate[", "qk_norm_rope[")  # the bandwidth-bound kernels: 16-byte vectors or bust


def fit(tmp_path, subset: str, cuda: bool) -> list[dict]:
    out = tmp_path / "fit.json"
    so_files = aot._default_shared_objects() if cuda else []
    targets = [a for so in so_files for a in ("--so", str(so))] or ["--no-cuda"]
    result = aot.run_in_subprocess(["--subset", subset, "--json", str(out), *targets], timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def assert_vector_io(rows: list[dict]) -> None:
    """Aligned norm/RoPE configs load and store 16-byte vectors only (ld/st.global.v4); a scalar access
    is allowed only where the spec says the rows are unaligned (or RoPE halves are not 16-byte aligned)."""
    for row in rows:
        if not row["name"].startswith(VECTOR_FAMILIES):
            continue
        accesses = row["global_accesses"]
        scalar = accesses.get("ld", 0) + accesses.get("st", 0)
        if ",aligned," in row["name"] and row["vector_io"]:
            assert scalar == 0 and accesses.get("ld.v4") and accesses.get("st.v4"), row
        elif scalar:
            assert not row["vector_io"], row


def test_every_triton_config_is_covered():
    names = {spec.name for spec in all_aot_specs()}
    for config in norm_modulate.triton_configs():
        for dtype in ("fp32", "bf16"):
            assert any(f"[{dtype},aligned,BLOCK_M={config.block_m},BLOCK_D={config.block_d}," in n for n in names)
    for config in qk_norm_rope.triton_configs():
        assert any(f"aligned,BLOCK_R={config.block_r},BLOCK_D={config.block_d}," in n for n in names)
    # the rule only ever picks enumerated configs, including for the head dims / widths in use
    for dim in (1, 8, 72, 88, 100, 1152, 1408, 3072, 8192):
        assert norm_modulate.triton_config(dim) in norm_modulate.triton_configs()
    subsets = [spec.representative for spec in all_aot_specs()]
    assert 0 < sum(subsets) < len(subsets) // 4  # a small default set; the slow test compiles the rest


def test_representative_kernels_fit_and_vectorize(tmp_path):
    rows = fit(tmp_path, "representative", cuda=True)
    triton_rows = [r for r in rows if r["source"] == "triton"]
    assert len(triton_rows) == 2 * sum(spec.representative for spec in all_aot_specs())
    assert_vector_io(triton_rows)
    aligned = [r["name"] for r in triton_rows if ",aligned," in r["name"] and r["name"].startswith(VECTOR_FAMILIES)]
    assert any("Dh=88" in name for name in aligned) and any("BLOCK_D=4096" in name for name in aligned)
    cuda_rows = [r for r in rows if r["source"] != "triton"]
    if aot._default_shared_objects():
        for arch in ("sm_80", "sm_90a"):
            kernels = {r["name"] for r in cuda_rows if r["arch"] == arch}
            assert len(kernels) >= sum(CUDA_KERNELS_PER_ARCH.values()), f"{arch}: {sorted(kernels)}"
            for kernel, count in CUDA_KERNELS_PER_ARCH.items():
                assert sum(kernel in k for k in kernels) == count, f"{arch} {kernel}: {sorted(kernels)}"


@pytest.mark.slow
def test_every_other_kernel_config_fits_and_vectorizes(tmp_path):
    rows = fit(tmp_path, "rest", cuda=False)
    assert len(rows) == 2 * sum(not spec.representative for spec in all_aot_specs())
    assert_vector_io(rows)


def test_native_module_was_built_when_nvcc_was_present():
    """An install that found nvcc must have produced _C (the CUDA fit above then checks it)."""
    info = backends._build_info()
    if not info.get("nvcc"):
        pytest.skip(f"no CUDA build to check: {info['reason']}")
    assert aot._default_shared_objects(), "nvcc was found at install time but _C is missing"
