"""The native modules: _C_cpu always built; _C built when nvcc was present, importable without a driver,
and failing with a clear RuntimeError (never a crash) when called without one; backends say why."""

import os
import subprocess
import sys

import pytest
import torch

from dit_kernels import backends

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
