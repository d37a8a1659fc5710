"""``python -m dit_kernels.selftest``: one command that proves the GPU path on the first GPU it meets, and
runs the CPU subset anywhere else.

On a CUDA device (about 8 minutes: the steps' budgets below add up to 480 s): every ``-m gpu`` test;
CUDA-graph capture and replay of every registered family; ``torch.compile`` of every patched family on the
Triton kernels; the op microbenchmarks (``benchmarks/``: ``triton.testing.do_bench``, L2 flushed, GB/s and
TFLOP/s against the device's roofline); the main job's end-to-end rows (eager, patched, + CUDA graphs,
+ step cache, torch.compile) at FLUX's real width; the traffic model. On a CPU it lists what it would run
there and runs what a CPU can: the traffic model, patched-vs-eager parity of every family's tiny model,
and a tiny main-job loop.

Each step has a time budget. On a GPU each runs in its own process group (``--step NAME``), killed when
past its budget; on a CPU each runs in a thread that is abandoned when past it. Either way the step is
reported as cut and the next one starts: nothing hangs. One markdown report, headed by the device, goes
to ``--out`` (default ``selftest-report.md``) and stdout; the exit status is 1 when a step failed or was cut.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]  # the clone: tests/ and benchmarks/ live there
GPU, CPU = "gpu", "cpu"
PARITY_BOUND = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max |patched - eager| / max |eager| (bf16: a few ulps)


@dataclass(frozen=True)
class Step:
    """One check: ``run() -> (ok, markdown)``, on the devices in ``where`` (GPU, CPU), cut past ``budget_s``."""

    name: str
    what: str
    budget_s: float
    where: frozenset
    run: Callable[[], tuple[bool, str]]


@dataclass
class Outcome:
    step: Step
    status: str  # "ok", "failed", "cut", or "not run: <why>"
    seconds: float
    text: str


# ----------------------------------------------------------------------------------------- helpers


def _command(args: Sequence[str], budget_s: Optional[float] = None) -> tuple[int, str]:
    """(return code, stdout + stderr) of ``args`` run from the clone, in a process group of its own that is
    killed whole past ``budget_s`` (return code None then)."""
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=budget_s)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def _tail(text: str, lines: int = 25) -> str:
    return "```\n" + "\n".join(text.rstrip().splitlines()[-lines:]) + "\n```"


def _tiny(family: str, device: str, dtype: torch.dtype, batch: int = 2):
    """The family's tiny model on ``device`` in ``dtype`` and one forward's inputs (a 16 x 16 latent, up to 32
    text tokens, ``batch`` samples: a CFG call)."""
    from dit_kernels.bench import zoo
    from dit_kernels.models import family_named

    torch.manual_seed(0)
    model = zoo.build(family, "tiny").to(device, dtype)
    text = min(32, zoo.default_text_len(family, family_named(family).configs["tiny"]))
    return model, zoo.transformer_inputs(family, model, zoo.Shape(batch, 16, 16, text), dtype, device)


def _forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _relative(ours: torch.Tensor, eager: torch.Tensor) -> float:
    return ((ours.float() - eager.float()).abs().max() / eager.float().abs().max().clamp_min(1e-12)).item()


def _per_family(check: Callable[[str], tuple[bool, list]], header: Sequence[str]) -> tuple[bool, str]:
    """``check(family) -> (ok, cells)`` for every registered family, as a table (an exception fails its row)."""
    from dit_kernels.models import FAMILY_MODULES

    rows, all_ok = ["| family | " + " | ".join(header) + " | ok |", "|---|" + "---|" * (len(header) + 1)], True
    for family in FAMILY_MODULES:
        try:
            ok, cells = check(family)
        except Exception as err:  # noqa: BLE001 (a family's failure is its row, the others still run)
            ok, cells = False, [f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"] + [""] * (len(header) - 1)
        all_ok &= ok
        rows.append(f"| {family} | " + " | ".join(map(str, cells)) + f" | {'yes' if ok else '**no**'} |")
    return all_ok, "\n".join(rows)


# ----------------------------------------------------------------------------------------- steps


def gpu_tests() -> tuple[bool, str]:
    """Every ``-m gpu`` test of tests/ (this file's own test excluded: it runs the selftest)."""
    code, out = _command([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
                          "--ignore=tests/test_selftest.py", "tests/"])  # fmt: skip
    return code == 0, _tail(out, 40)


def cuda_graphs_every_family() -> tuple[bool, str]:
    """Each family's tiny model, bf16, patched with CUDA graphs: warm-ups, a capture, replays; the replayed
    output against eager diffusers."""
    import dit_kernels
    from dit_kernels.graphs import graph_runners

    def check(family):
        model, inputs = _tiny(family, "cuda", torch.bfloat16)
        eager = _forward(model, inputs)
        dit_kernels.patch(model, cuda_graphs=True)
        outs = [_forward(model, inputs) for _ in range(4)]
        stats = sum((runner.stats for runner in graph_runners(model).values()), Counter())
        error = _relative(outs[-1], eager)
        replayed = stats["captures"] >= 1 and stats["replays"] >= 1 and not stats["failures"]
        ok = replayed and error <= PARITY_BOUND[torch.bfloat16]
        return ok, [stats["captures"], stats["replays"], stats["failures"], f"{error:.2e}"]

    return _per_family(check, ["captures", "replays", "failures", "max rel. diff vs eager"])


def compile_every_family() -> tuple[bool, str]:
    """Each family's tiny model, bf16, patched on the Triton kernels, under ``torch.compile``: output against
    eager diffusers, compile time."""
    import dit_kernels

    def check(family):
        model, inputs = _tiny(family, "cuda", torch.bfloat16)
        eager = _forward(model, inputs)
        dit_kernels.patch(model, backend="triton", cuda_graphs=False)
        compiled = torch.compile(model)
        start = time.perf_counter()
        _forward(compiled, inputs)
        seconds = time.perf_counter() - start
        error = _relative(_forward(compiled, inputs), eager)
        return error <= PARITY_BOUND[torch.bfloat16], [f"{seconds:.1f}", f"{error:.2e}"]

    return _per_family(check, ["first call (s, compile included)", "max rel. diff vs eager"])


def op_microbenchmarks() -> tuple[bool, str]:
    """benchmarks/ without the block forwards: each op's time, GB/s and TFLOP/s against the roofline."""
    code, out = _command([sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "-s", "-q",
                          "-p", "no:cacheprovider", "-k", "not block_forward"])  # fmt: skip
    lines = [line.strip() for line in out.splitlines() if "GB/s" in line or "TFLOP/s" in line]
    return code == 0, "\n".join(f"- {line}" for line in lines) + "\n\n" + _tail(out, 5)


def end_to_end() -> tuple[bool, str]:
    """The main job (``python -m dit_kernels.bench``) on its default family (FLUX) at its real width (config
    "small": one block of each kind), bf16: eager, patched, + CUDA graphs, + step cache, torch.compile."""
    from dit_kernels.models import DEFAULT_FAMILY

    with tempfile.TemporaryDirectory() as out_dir:
        code, out = _command([sys.executable, "-m", "dit_kernels.bench", "--model", DEFAULT_FAMILY, "--config", "small",
                              "--dtype", "bf16", "--steps", "8", "--repeats", "3", "--compile", "--cuda-graphs",
                              "--out", out_dir])  # fmt: skip
        results = Path(out_dir, "results.md")
        return code == 0 and results.exists(), results.read_text() if results.exists() else _tail(out)


def traffic_model() -> tuple[bool, str]:
    """The launch / traffic model of the default family's (FLUX's) blocks at 1024 px, batch 1 and 2 (meta device,
    no kernel runs)."""
    from dit_kernels.bench import traffic
    from dit_kernels.models import DEFAULT_FAMILY

    return True, traffic.table((DEFAULT_FAMILY,))


def cpu_parity_every_family() -> tuple[bool, str]:
    """Each family's tiny model, fp32, batch 2, patched on the torch reference ops, against eager diffusers."""
    import dit_kernels

    def check(family):
        model, inputs = _tiny(family, "cpu", torch.float32)
        eager = _forward(model, inputs)
        patched = copy.deepcopy(model)
        dit_kernels.patch(patched, backend="torch")
        error = _relative(_forward(patched, inputs), eager)
        return error <= PARITY_BOUND[torch.float32], [f"{error:.2e}"]

    return _per_family(check, ["max rel. diff vs eager"])


def tiny_main_job() -> tuple[bool, str]:
    """The main job's loop on its default family's tiny model: eager, patched, + step cache (2 steps, 1 round)."""
    from dit_kernels.bench.__main__ import main
    from dit_kernels.models import DEFAULT_FAMILY

    with tempfile.TemporaryDirectory() as out_dir:  # its table is printed as it runs, then is the step's text
        main(["--model", DEFAULT_FAMILY, "--config", "tiny", "--steps", "2", "--repeats", "1", "--out", out_dir])
        return True, Path(out_dir, "results.md").read_text()


STEPS = (
    Step("gpu-tests", "every `-m gpu` test (pytest)", 150, frozenset({GPU}), gpu_tests),
    Step("cuda-graphs", "CUDA-graph capture + replay of every family vs eager", 45, frozenset({GPU}),
         cuda_graphs_every_family),  # fmt: skip
    Step("compile", "torch.compile of every patched family on the Triton kernels vs eager", 120, frozenset({GPU}),
         compile_every_family),  # fmt: skip
    Step("op-bench", "op microbenchmarks: GB/s, TFLOP/s vs the device roofline", 60, frozenset({GPU}),
         op_microbenchmarks),  # fmt: skip
    Step("end-to-end", "main job at FLUX's real width: eager, patched, + graphs, + cache, compile", 90,
         frozenset({GPU}), end_to_end),  # fmt: skip
    Step("traffic", "launch / traffic model of FLUX's blocks, batch 1 and 2", 15, frozenset({GPU, CPU}),
         traffic_model),  # fmt: skip
    Step("parity", "patched vs eager, every family's tiny model, fp32", 25, frozenset({CPU}),
         cpu_parity_every_family),  # fmt: skip
    Step("tiny-e2e", "the main job's loop on its default family's tiny model", 15, frozenset({CPU}), tiny_main_job),
)


# ----------------------------------------------------------------------------------------- running


def run_in_thread(step: Step) -> Outcome:
    """``step`` in a daemon thread, abandoned past its budget (reported as cut)."""
    result: list = []

    def target():
        try:
            result.append(step.run())
        except Exception:  # noqa: BLE001 (reported as the step's failure)
            result.append((False, _tail(traceback.format_exc())))

    start = time.perf_counter()
    thread = threading.Thread(target=target, name=f"selftest-{step.name}", daemon=True)
    thread.start()
    thread.join(step.budget_s)
    seconds = time.perf_counter() - start
    if not result:
        return Outcome(step, "cut", seconds, f"past its {step.budget_s:g} s budget: abandoned")
    ok, text = result[0]
    return Outcome(step, "ok" if ok else "failed", seconds, text)


def run_in_process(step: Step) -> Outcome:
    """``step`` as ``python -m dit_kernels.selftest --step NAME`` in its own process group, killed whole past
    its budget (reported as cut). Exit status 0: ok, 1: failed; stdout: the step's markdown."""
    start = time.perf_counter()
    code, out = _command([sys.executable, "-m", "dit_kernels.selftest", "--step", step.name], step.budget_s)
    seconds = time.perf_counter() - start
    if code is None:
        return Outcome(step, "cut", seconds, f"past its {step.budget_s:g} s budget: killed\n\n" + _tail(out))
    return Outcome(step, "ok" if code == 0 else "failed", seconds, out.strip())


def run_steps(steps: Sequence[Step], where: str, isolate: bool) -> list[Outcome]:
    """Each step that runs ``where`` (isolated in a process group, or in a thread); the others not run."""
    outcomes = []
    for step in steps:
        if where not in step.where:
            why = "needs a CUDA device" if GPU in step.where else "the CPU subset (a GPU run covers it)"
            outcomes.append(Outcome(step, f"not run: {why}", 0.0, ""))
            continue
        outcomes.append(run_in_process(step) if isolate else run_in_thread(step))
        print(f"selftest: {step.name}: {outcomes[-1].status} ({outcomes[-1].seconds:.0f} s)", file=sys.stderr)
    return outcomes


def device_line() -> str:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{torch.cuda.get_device_name()} (sm_{major}{minor}, CUDA {torch.version.cuda})"
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores); no CUDA device"


def report(outcomes: Sequence[Outcome], where: str) -> str:
    import diffusers

    from dit_kernels import backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    available = ", ".join(f"{a.name} {'yes' if a.available else 'no'}" for a in backends.report().values())
    lines = [
        "# dit_kernels selftest",
        "",
        f"- device: **{device_line()}**",
        f"- mode: {where} ({'every step isolated in a process group' if where == GPU else 'CPU subset, threads'})",
        f"- torch {torch.__version__}, triton {triton_version}, diffusers {diffusers.__version__}, "
        f"python {platform.python_version()}",
        f"- backends: {available}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        "",
        "| step | what | budget (s) | took (s) | status |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {o.step.name} | {o.step.what} | {o.step.budget_s:g} | {o.seconds:.1f} | {o.status} |"
              for o in outcomes]  # fmt: skip
    for o in outcomes:
        if o.text:
            lines += ["", f"## {o.step.name}: {o.status}", "", o.text]
    return "\n".join(lines) + "\n"


def main(argv=None, steps: Sequence[Step] = STEPS) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="selftest-report.md", help="report file (default selftest-report.md)")
    parser.add_argument("--only", action="append", choices=[s.name for s in steps], help="run only these steps")
    parser.add_argument("--list", action="store_true", help="list the steps and exit")
    parser.add_argument("--step", choices=[s.name for s in steps], help=argparse.SUPPRESS)  # one isolated step
    args = parser.parse_args(argv)
    if args.step:
        ok, text = next(s for s in steps if s.name == args.step).run()
        print(text)
        return 0 if ok else 1
    if args.list:
        for s in steps:
            print(f"{s.name:12} {'/'.join(sorted(s.where)):8} {s.budget_s:5g} s  {s.what}")
        return 0
    where = GPU if torch.cuda.is_available() else CPU
    chosen = [s for s in steps if not args.only or s.name in args.only]
    outcomes = run_steps(chosen, where, isolate=where == GPU)
    text = report(outcomes, where)
    Path(args.out).write_text(text)
    print(text)
    return 1 if any(o.status in ("failed", "cut") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
