"""What can run here, and why not.

Every op takes ``backend=None | "torch" | "triton" | "cuda" | "cuda_emu"``:

- ``"torch"``: the pure-torch reference (the spec). Runs anywhere.
- ``"triton"``: the Triton kernels. Needs a CUDA device, or ``TRITON_INTERPRET=1`` set before
  ``dit_kernels`` is imported (then they run on CPU tensors, slowly: that is how the tests run them).
- ``"cuda"``: the CUDA C++ kernels of ``dit_kernels._C``. Needs ``_C`` built with nvcc and a device.
- ``"cuda_emu"``: the same CUDA C++ kernel source built by g++ as ``dit_kernels._C_cpu``, every CUDA
  thread a real ``std::thread``. CPU tensors only; a test vehicle, far too slow for real work.
- ``None``: the device's best: Triton on CUDA tensors, the reference on CPU tensors.

``report()`` returns all of this as data (``python -m dit_kernels.backends`` prints it).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("dit_kernels")

BACKENDS = ("torch", "triton", "cuda", "cuda_emu")

# Read once, at import: Triton decides at decoration time whether kernels are interpreted.
INTERPRETER_ON = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Availability:
    """Whether one capability is usable here; ``reason`` says why not (or what it is)."""

    name: str
    available: bool
    reason: str


def _build_info() -> dict:
    """What setup.py recorded at build time (nvcc found or not, and why)."""
    path = Path(__file__).parent.with_name("_build_info.json")  # dit_kernels/_build_info.json
    if not path.exists():
        return {"nvcc": None, "reason": "no _build_info.json: the package was not built with setup.py"}
    return json.loads(path.read_text())


@functools.cache
def cuda_device() -> Availability:
    if torch.cuda.is_available():
        return Availability("cuda_device", True, torch.cuda.get_device_name(0))
    if torch.version.cuda is None:
        return Availability("cuda_device", False, f"torch {torch.__version__} is a CPU-only build")
    return Availability("cuda_device", False, "torch sees no CUDA device")


@functools.cache
def triton() -> Availability:
    try:
        import triton as _triton
    except ImportError as err:
        return Availability("triton", False, f"triton is not importable: {err}")
    if INTERPRETER_ON:
        return Availability("triton", True, f"triton {_triton.__version__}, interpreter (TRITON_INTERPRET=1)")
    if not cuda_device().available:
        return Availability(
            "triton",
            False,
            "no CUDA device; set TRITON_INTERPRET=1 before importing dit_kernels to run Triton kernels on CPU",
        )
    return Availability("triton", True, f"triton {_triton.__version__}")


@functools.cache
def _native_module(name: str):
    """Import ``dit_kernels.<name>``; returns (module or None, reason)."""
    try:
        return importlib.import_module(f"dit_kernels.{name}"), "importable"
    except ImportError as err:
        return None, str(err)


def native_module():
    """The ``dit_kernels._C`` module, or RuntimeError saying why it cannot be used."""
    module, reason = _native_module("_C")
    if module is None:
        info = _build_info()
        why = info["reason"] if not info.get("nvcc") else f"import failed: {reason}"
        raise RuntimeError(f"dit_kernels._C is not available: {why}")
    return module


@functools.cache
def native() -> Availability:
    try:
        module = native_module()
    except RuntimeError as err:
        return Availability("cuda_kernels", False, str(err))
    try:
        count = module.device_count()
    except RuntimeError as err:
        return Availability("cuda_kernels", False, f"dit_kernels._C is built but cannot run: {err}")
    if count == 0:
        return Availability("cuda_kernels", False, "dit_kernels._C is built but there is no CUDA device")
    return Availability("cuda_kernels", True, f"dit_kernels._C on {count} device(s)")


def emulation_module():
    """The ``dit_kernels._C_cpu`` module (CUDA kernel source on CPU threads), or RuntimeError."""
    module, reason = _native_module("_C_cpu")
    if module is None:
        raise RuntimeError(f"dit_kernels._C_cpu (CPU emulation of the CUDA kernels) is not importable: {reason}")
    return module


@functools.cache
def emulation() -> Availability:
    try:
        emulation_module()
    except RuntimeError as err:
        return Availability("cuda_emulation", False, str(err))
    return Availability("cuda_emulation", True, "dit_kernels._C_cpu (g++ build, one std::thread per CUDA thread)")


def _optional_package(name: str) -> Availability:
    try:
        module = importlib.import_module(name)
    except Exception as err:  # optional extras fail in many ways (ImportError, missing CUDA libs)
        return Availability(name, False, f"not importable: {type(err).__name__}: {err}")
    return Availability(name, True, getattr(module, "__version__", "importable"))


@functools.cache
def flash_attn() -> Availability:
    return _optional_package("flash_attn")


@functools.cache
def xformers() -> Availability:
    return _optional_package("xformers")


def report() -> dict[str, Availability]:
    """Every capability, for a patch report, a test or a human (``python -m dit_kernels.backends``)."""
    checks = (cuda_device, triton, native, emulation, flash_attn, xformers)
    return {a.name: a for a in (check() for check in checks)}


class Resolved(str):
    """A backend name that ``resolve`` checked for one device (a patch does it once). The ops dispatch a
    ``Resolved`` name straight through their launcher table; any other name is resolved per call."""

    __slots__ = ()


@torch.compiler.assume_constant_result  # torch.compile runs it at trace time and bakes the answer in
def resolve(backend: str | None, device: torch.device) -> Resolved:
    """The concrete backend to run for tensors on ``device``; RuntimeError if the asked one cannot run."""
    if backend is None or backend == "auto":
        return Resolved(_best(device))
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} or None")
    if backend == "triton":
        _require(triton())
    elif backend == "cuda":
        if device.type != "cuda":
            raise RuntimeError(
                f"backend='cuda' needs CUDA tensors, got {device}; backend='cuda_emu' runs the same kernel "
                "source on CPU tensors"
            )
        _require(native())
    elif backend == "cuda_emu":
        if device.type != "cpu":
            raise RuntimeError(f"backend='cuda_emu' runs on CPU tensors only, got {device}")
        _require(emulation())
    return Resolved(backend)


def _require(availability: Availability) -> None:
    if not availability.available:
        raise RuntimeError(availability.reason)


def _best(device: torch.device) -> str:
    if device.type != "cuda":
        return "torch"
    if triton().available:
        return "triton"
    _log_once(f"Triton unavailable on {device} ({triton().reason}); using the torch reference ops")
    return "torch"


@functools.cache
def _log_once(message: str) -> None:
    log.warning(message)

