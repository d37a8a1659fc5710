"""Build of dit_kernels' native modules through CMake (see CMakeLists.txt).

- ``dit_kernels._C_cpu`` always: g++ only, the CUDA kernel source run by the CPU emulation.
- ``dit_kernels._C`` when nvcc is found (``$CUDACXX`` or ``nvcc`` on ``PATH``) and ``DIT_KERNELS_NO_CUDA``
  is unset. Without nvcc, or if the CUDA build fails, the install still succeeds without ``_C``, and the
  reason lands in ``dit_kernels/_build_info.json`` for ``dit_kernels.backends`` to report.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def find_nvcc():
    """(path to nvcc or None, why)."""
    if os.environ.get("DIT_KERNELS_NO_CUDA"):
        return None, "built without nvcc: DIT_KERNELS_NO_CUDA was set at install time"
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    if not nvcc:
        return None, "built without nvcc: no nvcc on PATH (and CUDACXX unset) at install time"
    return nvcc, f"built with {nvcc}"


class CMakeBuild(build_ext):
    """One CMake build produces every module into the package directory of the build (or the source
    tree for editable installs)."""

    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        nvcc, reason = find_nvcc()
        if nvcc:
            try:
                self._cmake(out_dir, cuda=True, nvcc=nvcc)
            except subprocess.CalledProcessError as err:
                print(f"dit_kernels: the CUDA build failed ({err}); building without _C", file=sys.stderr)
                nvcc, reason = None, f"the CUDA build with {nvcc} failed at install time: {err}"
        if not nvcc:
            self._cmake(out_dir, cuda=False, nvcc=None)
        (out_dir / "_build_info.json").write_text(json.dumps({"nvcc": nvcc, "reason": reason}, indent=1) + "\n")

    def _produced(self) -> list[Path]:
        """Everything the CMake build wrote: _C_cpu, _C (when built) and _build_info.json."""
        out_dir = Path(self.build_lib).resolve() / "dit_kernels"
        return sorted(p for p in out_dir.iterdir() if p.name.startswith("_C") or p.name == "_build_info.json")

    def get_outputs(self):
        return sorted({*super().get_outputs(), *map(str, self._produced())})

    def copy_extensions_to_source(self):
        """Editable installs: setuptools copies only the declared extension; copy every produced file."""
        package_dir = Path(self.get_finalized_command("build_py").get_package_dir("dit_kernels"))
        for path in self._produced():
            shutil.copy2(path, package_dir / path.name)

    def _cmake(self, out_dir: Path, cuda: bool, nvcc):
        import pybind11

        build_dir = Path(self.build_temp).resolve() / ("cuda" if cuda else "cpu")
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DDIT_KERNELS_CUDA={'ON' if cuda else 'OFF'}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if nvcc:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(ext_modules=[CMakeExtension("dit_kernels._C_cpu")], cmdclass={"build_ext": CMakeBuild})
