"""The native modules: _C_cpu always built; _C built when nvcc was present, importable without a driver,
and failing with a clear RuntimeError (never a crash) when called without one; backends say why. The
SASS of _C: the vector path of each kernel moves all its global data in 128-bit accesses."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit_kernels import aot, backends

NO_OPERAND = (0, 0, 0)


def test_emulation_module_is_built_and_marked():
    module = backends.emulation_module()
    assert module.EMULATED is True
    assert backends.emulation().available


def test_native_module_without_driver_raises_clear_errors():
    info = backends._build_info()
    if not info.get("nvcc"):
        assert not backends.native().available
        assert info["reason"] in backends.native().reason
        pytest.skip(f"dit_kernels._C not built here: {info['reason']}")
    if torch.cuda.is_available():
        pytest.skip("a driver is present: the no-driver behaviour cannot be observed")
    module = backends.native_module()
    assert module.EMULATED is False
    with pytest.raises(RuntimeError, match="cudaGetDeviceCount"):
        module.device_count()
    x = torch.randn(1, 2, 8)
    with pytest.raises(RuntimeError, match="cudaErrorInsufficientDriver|cudaErrorNoDevice"):
        module.norm_modulate("float32", 2, 2, 8, x.data_ptr(), 0, (x.data_ptr(), 16, 8), NO_OPERAND,
                             NO_OPERAND, NO_OPERAND, NO_OPERAND, 0, 0, 1e-6, True, 0)
    assert not backends.native().available
    assert "cannot run" in backends.native().reason


def test_native_binding_validates_its_arguments():
    module = backends.emulation_module()
    with pytest.raises(ValueError, match="unsupported dtype"):
        module.norm_modulate("int8", 2, 2, 8, 1, 0, (1, 16, 8), NO_OPERAND, NO_OPERAND, NO_OPERAND, NO_OPERAND,
                             0, 0, 1e-6, True, 0)
    with pytest.raises(ValueError, match="x is required"):
        module.norm_modulate("float32", 2, 2, 8, 1, 0, NO_OPERAND, NO_OPERAND, NO_OPERAND, NO_OPERAND, NO_OPERAND,
                             0, 0, 1e-6, True, 0)
    with pytest.raises(ValueError, match="dim > 0"):
        module.norm_modulate("float32", 3, 2, 8, 1, 0, (1, 16, 8), NO_OPERAND, NO_OPERAND, NO_OPERAND, NO_OPERAND,
                             0, 0, 1e-6, True, 0)


def test_backend_report_is_data_and_printable():
    report = backends.report()
    assert {"cuda_device", "triton", "cuda_kernels", "cuda_emulation", "flash_attn", "xformers"} <= set(report)
    for availability in report.values():
        assert isinstance(availability.available, bool) and availability.reason
    printed = subprocess.run([sys.executable, "-m", "dit_kernels.backends"], capture_output=True, text=True, check=True)
    assert "cuda_emulation" in printed.stdout
    assert "RuntimeWarning" not in printed.stderr  # runpy's "found in sys.modules": the CLI is a __main__


def test_triton_backend_without_gpu_or_interpreter_says_how_to_enable_it():
    code = (
        "import torch, dit_kernels.ops as ops\n"
        "try:\n    ops.layernorm_modulate(torch.randn(1, 2, 8), backend='triton')\n"
        "except RuntimeError as err:\n    print('refused:', err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if torch.cuda.is_available():
        pytest.skip("with a GPU the Triton backend is available")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "refused:" in out and "TRITON_INTERPRET=1" in out


# Mangled template arguments of the kernels' element types, and of their VECTOR flag (Lb1E / Lb0E).
ELEMENT_TYPES = {"float": "f", "half": "6__half", "bf16": "13__nv_bfloat16"}


def _sass_by_kernel(shared_object: Path) -> dict[tuple[str, str], str]:
    """``cuobjdump -sass`` of the module: {(arch, mangled kernel name): its SASS}."""
    text = subprocess.run([aot.find_cuobjdump(), "-sass", str(shared_object)], capture_output=True, text=True,
                          check=True, timeout=300).stdout  # fmt: skip
    kernels, arch, name = {}, None, None
    for line in text.splitlines():
        if match := re.match(r"\s*arch = (sm_\w+)", line):
            arch, name = match.group(1), None
        elif match := re.match(r"\s*Function : (\S+)", line):
            name = match.group(1)
            kernels[(arch, name)] = ""
        elif name is not None:
            kernels[(arch, name)] += line + "\n"
    return kernels


def _global_accesses(sass: str) -> list[str]:
    """The global load / store opcodes of a kernel, with their width suffixes (LDG.E.128.CONSTANT, ...)."""
    return re.findall(r"\b((?:LDG|STG)\.[\w.]+)", sass)


def test_vector_paths_use_128_bit_global_accesses():
    """Issue 17: the aligned launches of norm_modulate and qk_norm_rope load and store 16 bytes per
    instruction (no LDG.E.U16 / STG.E.U16) on sm_80 and sm_90a; the scalar fallback is built beside them."""
    spec = importlib.util.find_spec("dit_kernels._C")
    if spec is None:
        pytest.skip(f"dit_kernels._C not built here: {backends._build_info()['reason']}")
    kernels = _sass_by_kernel(Path(spec.origin))
    signatures = (("norm_modulate_kernel", "NormModulateParams"), ("qk_norm_rope_kernel", "QkNormRopeParams"))
    for arch in ("sm_80", "sm_90a"):
        for kernel, params in signatures:
            for dtype, mangled in ELEMENT_TYPES.items():
                prefix = f"_ZN2dk{len(kernel)}{kernel}I{mangled}"
                vector = kernels.get((arch, f"{prefix}Lb1EEEvNS_{len(params)}{params}Ei"))
                scalar = kernels.get((arch, f"{prefix}Lb0EEEvNS_{len(params)}{params}Ei"))
                what = f"{arch} {kernel}<{dtype}>"
                built = sorted(name for a, name in kernels if a == arch)
                assert vector is not None and scalar is not None, f"{what} (vector and scalar) not in {built}"
                accesses = _global_accesses(vector)
                assert any(a.startswith("LDG.E.128") for a in accesses), f"{what}: no 128-bit load in {accesses}"
                assert any(a.startswith("STG.E.128") for a in accesses), f"{what}: no 128-bit store in {accesses}"
                assert all(".128" in a for a in accesses), f"{what}: narrower global accesses {sorted(set(accesses))}"
                assert not any(".128" in a for a in _global_accesses(scalar)), f"{what}: scalar path uses vectors"
