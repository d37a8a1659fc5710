"""Gate 2 on the project's own kernels: every Triton config the launchers can pick, and every CUDA kernel
built into dit_kernels._C, compiled for sm_80 and sm_90a with no spill, no stack and shared memory
within the architecture's limit. Runs `python -m dit_kernels.aot` in a child process (no interpreter)."""

import json
from pathlib import Path

import pytest

from dit_kernels import aot, backends
from dit_kernels.ops import all_aot_specs, norm_modulate

# Instantiations of each CUDA kernel built into _C, per architecture.
CUDA_KERNELS_PER_ARCH = {
    "norm_modulate_kernel": 6,  # <{float, half, bf16}, {32, 256}>
    "qk_norm_rope_kernel": 3,  # <{float, half, bf16}>
}


def test_every_triton_config_is_covered():
    names = {spec.name for spec in all_aot_specs()}
    for config in norm_modulate.triton_configs():
        for dtype in ("fp32", "bf16"):
            assert any(f"[{dtype},BLOCK_M={config.block_m},BLOCK_D={config.block_d}," in n for n in names)
    # the rule only ever picks enumerated configs, including for the head dims / widths in use
    for dim in (1, 8, 72, 88, 100, 1152, 1408, 3072, 8192):
        assert norm_modulate.triton_config(dim) in norm_modulate.triton_configs()


def test_all_kernels_fit_sm80_and_sm90(tmp_path):
    out = tmp_path / "fit.json"
    so_files = sorted(Path(backends.__file__).parent.glob("_C.*.so"))
    targets = [a for so in so_files for a in ("--so", str(so))] or ["--no-cuda"]
    result = aot.run_in_subprocess(["--json", str(out), *targets], timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())
    triton_rows = [r for r in rows if r["source"] == "triton"]
    assert len(triton_rows) == 2 * len(all_aot_specs())
    cuda_rows = [r for r in rows if r["source"] != "triton"]
    if so_files:
        for arch in ("sm_80", "sm_90a"):
            kernels = {r["name"] for r in cuda_rows if r["arch"] == arch}
            assert len(kernels) >= sum(CUDA_KERNELS_PER_ARCH.values()), f"{arch}: {sorted(kernels)}"
            for kernel, count in CUDA_KERNELS_PER_ARCH.items():
                assert sum(kernel in k for k in kernels) == count, f"{arch} {kernel}: {sorted(kernels)}"


def test_native_module_was_built_when_nvcc_was_present():
    """An install that found nvcc must have produced _C (the CUDA fit above then checks it)."""
    info = backends._build_info()
    if not info.get("nvcc"):
        pytest.skip(f"no CUDA build to check: {info['reason']}")
    assert list(Path(backends.__file__).parent.glob("_C.*.so")), "nvcc was found at install time but _C is missing"
