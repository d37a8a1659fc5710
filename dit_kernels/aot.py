"""Gate 2: every kernel builds for sm_80 and sm_90a and fits, checked ahead of time with no GPU.

"Fits" means, per kernel and architecture:

- zero register spills (``spill_stores == spill_loads == 0``),
- no stack frame at all (``stack_bytes == 0``) and no other per-thread local memory. A stack frame is
  per-thread *local memory*, which lives in DRAM behind L1: it holds register spills, but also
  dynamically indexed arrays the compiler could not keep in registers, and both are performance bugs in
  kernels like ours (a spill is only the special case ptxas names). No kernel here needs a call stack
  (Triton inlines everything; ``printf``/``assert`` belong to debug builds), so the rule is strict,
- shared memory within the per-block opt-in maximum of the architecture (``SHARED_LIMITS``).

Triton kernels (``AotSpec``) are compiled with ``triton.compile`` for a ``GPUTarget`` (no driver is
needed). Register, spill and stack figures come from the ``ptxas -v`` log of the very ptxas run that
produced the cubin Triton would load (Triton's bundled ``ptxas`` for sm_80, ``ptxas-blackwell`` for
sm_90a, with Triton's own flags), captured through Triton's ``dump_ptxas_log`` knob. They are
cross-checked against ``cuobjdump -res-usage`` of that cubin (registers and stack must agree, or the
check raises); static shared memory and local memory come from cuobjdump, dynamic shared memory (what
Triton asks the driver for at launch) from ``metadata.shared``.

CUDA kernels of a compiled extension are read from the SASS embedded in the ``.so`` with ``cuobjdump
-res-usage``, which reports registers, stack, static shared and local memory per kernel and per
architecture, but not spill bytes: a spill needs a stack frame, so ``stack == 0`` proves there is none,
and a non-zero stack already fails the check (spills are then reported as -1, unknown). Dynamic shared
memory of a CUDA kernel is chosen at launch and is not in the binary.

``TRITON_INTERPRET`` must not be set in the compiling process (``@triton.jit`` would have produced
interpreter objects at import). The test suite sets it, so it runs this module in a child process
through ``run_in_subprocess``.

Command line::

    python -m dit_kernels.aot [--specs MODULE:FUNCTION ...] [--so PATH ... | --no-cuda]
                              [--arch 80 --arch 90] [--jobs N] [-k SUBSTRING] [--json OUT]
                              [--subset all|representative|rest]

Without ``--specs`` the specs are ``dit_kernels.ops.all_aot_specs()`` (if it exists); without ``--so``
the built ``dit_kernels._C`` extension is checked when there is one. Exit status 1 if anything fails.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dit_kernels.aot_spec import AotSpec

__all__ = [
    "SHARED_LIMITS",
    "AotError",
    "AotSpec",
    "FitResult",
    "check",
    "compile_triton",
    "cuda_kernel_resources",
    "main",
    "run_in_subprocess",
]

# Largest shared memory one block may use after opting in (cudaDevAttrMaxSharedMemoryPerBlockOptin),
# in bytes. The 1 KB the driver reserves per block is already excluded from these figures.
SHARED_LIMITS = {
    80: 166912,  # A100: 163 KB
    86: 101376,  # 99 KB
    87: 166912,  # Orin: 163 KB
    89: 101376,  # L40/4090: 99 KB
    90: 232448,  # H100/H200: 227 KB
    100: 232448,  # B200: 227 KB
    120: 101376,  # RTX 50: 99 KB
}

DEFAULT_ARCHS = (80, 90)
SUBSETS = ("all", "representative", "rest")


class AotError(RuntimeError):
    """The ahead-of-time check could not be run as asked (not: a kernel does not fit)."""


@dataclass(frozen=True)
class FitResult:
    """Resources of one kernel binary for one architecture. ``-1`` means "not reported"."""

    name: str
    arch: str  # "sm_80", "sm_90a", ...
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int  # static + dynamic (Triton); static only (CUDA .so)
    shared_limit: int
    local_bytes: int = 0
    error: str = ""  # non-empty: the kernel did not compile (or could not be inspected)
    source: str = ""  # "triton" or the path of the shared object
    seconds: float = 0.0  # compile + inspection time
    global_accesses: dict = field(default_factory=dict)  # PTX ld/st.global by width: {"ld.v4": 3, "st": 1}
    vector_io: bool = False  # the spec demands vector global accesses only (AotSpec.vector_io)

    @property
    def scalar_accesses(self) -> int:
        """Global loads and stores that move one element (Triton kernels; 0 for a CUDA .so: not read)."""
        return self.global_accesses.get("ld", 0) + self.global_accesses.get("st", 0)

    @property
    def ok(self) -> bool:
        return (
            not self.error
            and self.spill_stores == 0
            and self.spill_loads == 0
            and self.stack_bytes == 0
            and self.local_bytes == 0
            and 0 <= self.shared_bytes <= self.shared_limit
            and not (self.vector_io and self.scalar_accesses != 0)
        )

    @property
    def problems(self) -> list[str]:
        if self.error:  # the type of error and its last line (a Triton CompilationError ends with the cause)
            lines = [line.strip() for line in self.error.splitlines() if line.strip()] or ["error"]
            return [lines[0] if len(lines) == 1 else f"{lines[0].split(':')[0]}: {lines[-1]}"]
        out = []
        if self.spill_stores > 0 or self.spill_loads > 0:
            out.append(f"spills {self.spill_stores} B stored / {self.spill_loads} B loaded")
        if self.stack_bytes and self.spill_stores < 0:
            out.append(f"stack frame {self.stack_bytes} B (spills or a local array: cuobjdump cannot tell)")
        elif self.stack_bytes:
            out.append(f"stack frame {self.stack_bytes} B")
        if self.local_bytes:
            out.append(f"local memory {self.local_bytes} B")
        if self.shared_bytes > self.shared_limit:
            out.append(f"shared {self.shared_bytes} B > {self.shared_limit} B")
        if self.vector_io and self.scalar_accesses != 0:
            out.append(f"{self.scalar_accesses} scalar global loads/stores where the spec demands vectors")
        return out


# ----------------------------------------------------------------------------------------- tools


def arch_name(arch: int) -> str:
    """ptxas name of a compute capability as Triton targets it (sm_90 -> sm_90a: wgmma/TMA)."""
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def shared_limit(arch: int | str) -> int:
    if isinstance(arch, str):
        arch = int(re.sub(r"[^0-9]", "", arch))
    try:
        return SHARED_LIMITS[arch]
    except KeyError:
        raise AotError(f"no shared-memory limit known for sm_{arch}; known: {sorted(SHARED_LIMITS)}") from None


def _triton_bin_dir() -> Path | None:
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return path if path.is_dir() else None


def find_cuobjdump() -> str:
    """Triton's bundled cuobjdump (always present with triton on Linux), else the CUDA toolkit's."""
    candidates = []
    bin_dir = _triton_bin_dir()
    if bin_dir is not None:
        candidates.append(bin_dir / "cuobjdump")
    found = shutil.which("cuobjdump")
    if found:
        candidates.append(Path(found))
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates.append(Path(root) / "bin" / "cuobjdump")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise AotError("cuobjdump not found (it comes with triton's nvidia backend and with the CUDA toolkit)")


_RES_ARCH = re.compile(r"^\s*arch\s*=\s*(sm_\w+)")
_RES_FUNCTION = re.compile(r"^\s*Function\s+(.+?):\s*$")
_RES_FIELDS = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")


def _parse_res_usage(text: str) -> list[tuple[str, str, dict]]:
    """``cuobjdump -res-usage`` output -> [(arch, mangled name, {"REG": n, "STACK": n, ...})]."""
    out = []
    arch = ""
    pending = None
    for line in text.splitlines():
        if line.startswith("Fatbin"):
            arch, pending = "", None
            continue
        m = _RES_ARCH.match(line)
        if m:
            arch = m.group(1)
            continue
        m = _RES_FUNCTION.match(line)
        if m:
            pending = m.group(1)
            continue
        if pending is not None:
            fields = {k: int(v) for k, v in _RES_FIELDS.findall(line)}
            if "REG" in fields:
                out.append((arch, pending, fields))
            pending = None
    return out


def _res_usage(path: str | os.PathLike) -> list[tuple[str, str, dict]]:
    proc = subprocess.run([find_cuobjdump(), "-res-usage", str(path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AotError(f"cuobjdump -res-usage {path} failed ({proc.returncode}): {proc.stderr.strip()}")
    return _parse_res_usage(proc.stdout)


def _demangle(names: Sequence[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool or not any(n.startswith("_Z") for n in names):
        return list(names)
    proc = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=False)
    lines = proc.stdout.splitlines()
    return lines if proc.returncode == 0 and len(lines) == len(names) else list(names)


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _parse_ptxas_log(text: str) -> dict:
    """The one entry function of a Triton PTX module -> {"arch", "registers", "stack", "stores", "loads"}."""
    entries = _PTXAS_ENTRY.findall(text)
    frames = _PTXAS_FRAME.findall(text)
    regs = _PTXAS_REGS.findall(text)
    if len(entries) != 1 or len(frames) != 1 or len(regs) != 1:
        raise AotError(f"unexpected ptxas -v log (expected one entry function):\n{text}")
    stack, stores, loads = (int(x) for x in frames[0])
    return {"arch": entries[0][1], "registers": int(regs[0]), "stack": stack, "stores": stores, "loads": loads}


def _ptxas_rerun(ptx: str, arch: int, fp_fusion: bool) -> str:
    """Fallback when Triton's own ptxas log was not captured: assemble the PTX again with -v, with the
    flags Triton 3.9 uses (the cuobjdump cross-check catches a drift in them)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory(prefix="dit_aot_") as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch_name(arch)}"]
        if not fp_fusion:
            cmd.append("--fmad=false")
        cmd += [str(src), "-o", str(Path(tmp) / "k.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AotError(f"ptxas failed ({proc.returncode}): {proc.stderr}")
    return proc.stderr + proc.stdout


_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)\s")


def global_accesses(ptx: str) -> dict[str, int]:
    """The global load and store instructions of ``ptx`` by vector width: ``{"ld.v4": 3, "st.v4": 1,
    "ld": 2}``; a key without width counts scalar accesses (one element each), which a spec with
    ``vector_io`` must not have."""
    counts: dict[str, int] = {}
    for op, qualifiers in _GLOBAL_ACCESS.findall(ptx):
        width = re.search(r"\.(v\d)\b", qualifiers)
        key = f"{op}.{width.group(1)}" if width else op
        counts[key] = counts.get(key, 0) + 1
    return counts


# ------------------------------------------------------------------------------------ Triton side


def _check_environment() -> None:
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off", "no"):
        raise AotError(
            "TRITON_INTERPRET is set: @triton.jit kernels are interpreter objects in this process and cannot "
            "be compiled. Run the AOT check in a process without it: `env -u TRITON_INTERPRET python -m "
            "dit_kernels.aot` or dit_kernels.aot.run_in_subprocess()."
        )


def _prepare(spec: AotSpec) -> tuple[dict, dict, dict]:
    """Validate a spec against its kernel and return (signature, constexprs by index, attrs)."""
    from triton.runtime.jit import JITFunction

    kernel = spec.kernel
    if not isinstance(kernel, JITFunction):
        hint = " (it was decorated under TRITON_INTERPRET)" if type(kernel).__name__ == "InterpretedFunction" else ""
        raise AotError(f"{spec.name}: kernel is a {type(kernel).__name__}, not a @triton.jit function{hint}")
    params = kernel.params
    names = [p.name for p in params]
    if list(spec.signature) != names:
        missing = [n for n in names if n not in spec.signature]
        extra = [n for n in spec.signature if n not in names]
        raise AotError(
            f"{spec.name}: signature must list every parameter of {kernel.__name__} in order {names}; "
            f"missing {missing}, unknown {extra}" + ("" if missing or extra else ", order differs")
        )
    unknown = [k for k in spec.constexprs if k not in names]
    if unknown:
        raise AotError(f"{spec.name}: constexprs for unknown parameters {unknown}")
    constexprs = {}
    for i, p in enumerate(params):
        ty = spec.signature[p.name]
        if p.is_constexpr and ty != "constexpr":
            raise AotError(f"{spec.name}: {p.name} is tl.constexpr, its signature entry must be 'constexpr'")
        if ty == "constexpr":
            if p.name in spec.constexprs:
                constexprs[(i,)] = spec.constexprs[p.name]
            elif p.has_default:
                constexprs[(i,)] = p.default
            else:
                raise AotError(f"{spec.name}: constexpr {p.name} has no value and no default")
        elif p.name in spec.constexprs:
            raise AotError(f"{spec.name}: {p.name} has a value in constexprs but its signature is {ty!r}")
    if spec.divisible_by_16 is None:
        aligned = [n for n in names if spec.signature[n].startswith("*")]
    else:
        aligned = list(spec.divisible_by_16)
        bad = [n for n in aligned if n not in names or spec.signature[n] == "constexpr"]
        if bad:
            raise AotError(f"{spec.name}: divisible_by_16 names no runtime parameter: {bad}")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return dict(spec.signature), constexprs, attrs


def compile_triton(spec: AotSpec, arch: int) -> FitResult:
    """Compile one Triton config for ``sm_<arch>`` (90 -> sm_90a) and measure what it uses.

    Raises AotError when the check cannot run (interpreter mode, a malformed spec, inconsistent tool
    output); a kernel that fails to compile is returned as a FitResult with ``error`` set."""
    _check_environment()
    t0 = time.perf_counter()
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _prepare(spec)
    limit = shared_limit(arch)
    src = ASTSource(spec.kernel, signature, constexprs, attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    log = io.StringIO()
    try:
        with knobs.compilation.scope(), knobs.nvidia.scope(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
            knobs.compilation.always_compile = True  # so ptxas runs (and logs) even on a cache hit
            knobs.nvidia.dump_ptxas_log = True
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # noqa: BLE001  (any compile failure of the kernel: a failed row, not a crash)
        text = log.getvalue()
        detail = "\n".join(re.findall(r"ptxas[^\n]*(?:error|fatal)[^\n]*", text)) or str(exc).strip()
        return FitResult(
            spec.name, arch_name(arch), -1, -1, -1, -1, -1, limit,
            error=f"{type(exc).__name__}: {detail[-2000:]}", source="triton", seconds=time.perf_counter() - t0,
        )  # fmt: skip

    ptxas_log = log.getvalue()
    if "Compiling entry function" not in ptxas_log:
        ptxas_log = _ptxas_rerun(compiled.asm["ptx"], arch, compiled.metadata.enable_fp_fusion)
    figures = _parse_ptxas_log(ptxas_log)

    with tempfile.TemporaryDirectory(prefix="dit_aot_") as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = _res_usage(cubin)
    if len(usage) != 1:
        raise AotError(f"{spec.name}: expected one function in the cubin, cuobjdump listed {len(usage)}")
    cu_arch, _, res = usage[0]
    # (a bare cubin has no fatbin header, so cuobjdump names no arch for it)
    if (res["REG"], res["STACK"], cu_arch or figures["arch"]) != (
        figures["registers"],
        figures["stack"],
        figures["arch"],
    ):
        raise AotError(f"{spec.name}: ptxas -v and cuobjdump disagree: ptxas {figures}, cuobjdump {cu_arch} {res}")
    return FitResult(
        name=spec.name,
        arch=figures["arch"],
        registers=figures["registers"],
        spill_stores=figures["stores"],
        spill_loads=figures["loads"],
        stack_bytes=figures["stack"],
        shared_bytes=int(compiled.metadata.shared) + res.get("SHARED", 0),
        shared_limit=limit,
        local_bytes=res.get("LOCAL", 0),
        source="triton",
        global_accesses=global_accesses(compiled.asm["ptx"]),
        vector_io=spec.vector_io,
        seconds=time.perf_counter() - t0,
    )


# -------------------------------------------------------------------------------------- CUDA side


def cuda_kernel_resources(shared_object_path) -> list[FitResult]:
    """Every kernel (SASS) embedded in a compiled shared object, once per architecture, from
    ``cuobjdump -res-usage``. Spill bytes are not in that output: 0 when the kernel has no stack frame
    (a spill needs one), -1 (unknown) otherwise, and then the stack already fails ``ok``.
    ``shared_bytes`` is static shared memory only (nvcc 13 counts the 1 KB reserved block in it on
    sm_90a, which makes the comparison with the opt-in limit 1 KB conservative)."""
    path = Path(shared_object_path)
    if not path.is_file():
        raise AotError(f"no such shared object: {path}")
    t0 = time.perf_counter()
    usage = _res_usage(path)
    names = _demangle([name for _, name, _ in usage])
    results = []
    for (arch, _, res), name in zip(usage, names):
        spills = 0 if res.get("STACK", 0) == 0 else -1
        results.append(
            FitResult(
                name=name,
                arch=arch,
                registers=res["REG"],
                spill_stores=spills,
                spill_loads=spills,
                stack_bytes=res.get("STACK", 0),
                shared_bytes=res.get("SHARED", 0),
                shared_limit=shared_limit(arch),
                local_bytes=res.get("LOCAL", 0),
                source=str(path),
            )
        )
    elapsed = time.perf_counter() - t0
    return [FitResult(**{**asdict(r), "seconds": elapsed / max(len(results), 1)}) for r in results]


# ------------------------------------------------------------------------------------------ driver

_POOL_SPECS: list = []  # inherited by forked workers


def _pool_compile(job: tuple[int, int]) -> FitResult:
    index, arch = job
    spec = _POOL_SPECS[index]
    try:
        return compile_triton(spec, arch)
    except AotError as exc:
        return FitResult(spec.name, arch_name(arch), -1, -1, -1, -1, -1, SHARED_LIMITS.get(arch, 0),
                         error=f"AotError: {exc}", source="triton")  # fmt: skip


def check(specs: Iterable[AotSpec], archs: Sequence[int] = DEFAULT_ARCHS, jobs: int | None = None) -> list[FitResult]:
    """Compile every spec for every arch; results in (spec, arch) order. ``jobs`` worker processes
    (default: the number of CPUs, at most 2 here is plenty); 1 compiles in this process."""
    _check_environment()
    specs = list(specs)
    for spec in specs:  # malformed specs fail here, before any worker starts
        _prepare(spec)
    for arch in archs:
        shared_limit(arch)
    work = [(i, arch) for i in range(len(specs)) for arch in archs]
    if jobs is None:
        jobs = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    jobs = max(1, min(jobs, len(work)))
    if jobs == 1 or sys.platform != "linux":
        return [compile_triton(specs[i], arch) for i, arch in work]

    import multiprocessing

    global _POOL_SPECS
    _POOL_SPECS = specs
    try:
        # fork: the workers inherit the specs (JIT functions do not pickle) and the imported triton.
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            return pool.map(_pool_compile, work, chunksize=1)
    finally:
        _POOL_SPECS = []


def run_in_subprocess(args: Sequence[str] = (), **kwargs) -> subprocess.CompletedProcess:
    """``python -m dit_kernels.aot *args`` in a child process without TRITON_INTERPRET (for tests run
    under the interpreter). Output is captured as text; keyword arguments go to subprocess.run."""
    env = dict(kwargs.pop("env", None) or os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run([sys.executable, "-m", "dit_kernels.aot", *args], env=env, **kwargs)  # noqa: PLW1510


def _load_specs(target: str) -> list[AotSpec]:
    module_name, _, attr = target.partition(":")
    try:
        value = getattr(importlib.import_module(module_name), attr or "aot_specs")
    except (ImportError, AttributeError) as exc:
        raise AotError(f"--specs {target}: {type(exc).__name__}: {exc}") from exc
    specs = value() if callable(value) else value
    return list(specs)


def _default_specs() -> list[AotSpec]:
    ops = importlib.import_module("dit_kernels.ops")
    collect = getattr(ops, "all_aot_specs", None)
    return list(collect()) if callable(collect) else []


def _default_shared_objects() -> list[Path]:
    package = Path(__file__).resolve().parent
    return sorted(p for p in package.glob("_C.*") if p.suffix == ".so" and p.is_file())


def format_table(results: Sequence[FitResult]) -> str:
    width = min(max([len(r.name) for r in results] + [6]), 90)
    head = (
        f"{'kernel':<{width}}  {'arch':<7} {'regs':>4} {'spills(st/ld)':>13} {'stack':>5} {'shared/limit':>15}  "
        f"{'time':>5}  OK"
    )
    lines = [head]
    source = None
    for r in results:
        if r.source != source:
            source = r.source
            title = "Triton kernels" if source == "triton" else f"CUDA kernels in {source}"
            lines.append(f"-- {title} " + "-" * max(len(head) - len(title) - 4, 0))
        name = r.name if len(r.name) <= width else r.name[: width - 3] + "..."
        spills = f"{r.spill_stores}/{r.spill_loads}"
        shared = f"{r.shared_bytes}/{r.shared_limit}"
        status = "ok" if r.ok else "FAIL: " + "; ".join(r.problems)
        lines.append(
            f"{name:<{width}}  {r.arch:<7} {r.registers:>4} {spills:>13} {r.stack_bytes:>5} {shared:>15}  "
            f"{r.seconds:>5.2f}  {status}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--specs",
        action="append",
        default=[],
        metavar="MODULE:FUNCTION",
        help="load AotSpecs from FUNCTION() (or a list) in MODULE, instead of dit_kernels.ops",
    )
    parser.add_argument(
        "--so",
        action="append",
        default=[],
        metavar="PATH",
        help="check the CUDA kernels of this shared object (default: the built dit_kernels._C)",
    )
    parser.add_argument("--no-cuda", action="store_true", help="check no shared object")
    parser.add_argument("--arch", action="append", type=int, default=[], help="compute capability (default 80, 90)")
    parser.add_argument("--jobs", "-j", type=int, default=None, help="compile processes (default: CPUs)")
    parser.add_argument("-k", dest="filter", default=None, help="only specs whose name contains this")
    parser.add_argument("--subset", choices=SUBSETS, default="all",
                        help="representative: the specs marked so (model shapes); rest: the others")  # fmt: skip
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON")
    args = parser.parse_args(argv)
    archs = tuple(args.arch) or DEFAULT_ARCHS

    try:
        specs = [s for target in args.specs for s in _load_specs(target)] if args.specs else _default_specs()
        if args.filter:
            specs = [s for s in specs if args.filter in s.name]
        if args.subset != "all":
            specs = [s for s in specs if s.representative == (args.subset == "representative")]
        t0 = time.perf_counter()
        results = check(specs, archs, jobs=args.jobs)
        triton_seconds = time.perf_counter() - t0
        shared_objects = [] if args.no_cuda else ([Path(p) for p in args.so] or _default_shared_objects())
        for so in shared_objects:
            results += cuda_kernel_resources(so)
    except AotError as exc:
        print(f"dit_kernels.aot: {exc}", file=sys.stderr)
        return 2

    if results:
        print(format_table(results))
    failed = [r for r in results if not r.ok]
    print(
        f"\n{len(specs)} Triton config(s) x {len(archs)} arch(s) in {triton_seconds:.1f} s; "
        f"{len(shared_objects)} shared object(s); {len(results)} kernel binaries, {len(failed)} failing"
    )
    if not specs:
        print("note: no Triton specs found", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) | {"ok": r.ok} for r in results], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    # Run the copy imported as dit_kernels.aot, the one the op modules' AotSpecs come from.
    from dit_kernels.aot import main as _main

    sys.exit(_main())
