"""``python -m dit_kernels.selftest``: its CPU mode end to end (what CI can run), and the step budgets: a step
past its budget is cut and reported, the next one still runs, an isolated step's whole process group dies."""

import subprocess
import sys
import time

import pytest
import torch

from dit_kernels import selftest


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the selftest is the GPU run itself")
def test_cpu_mode_lists_the_gpu_steps_and_runs_the_cpu_subset(tmp_path, capsys):
    out = tmp_path / "report.md"
    assert selftest.main(["--out", str(out)]) == 0
    text = out.read_text()
    assert capsys.readouterr().out.endswith(text + "\n"), "the report is printed as written"
    assert "- device: **CPU" in text
    statuses = {o.split(" | ")[0].strip("| "): o.rsplit(" | ", 1)[1].strip(" |") for o in text.splitlines()
                if o.startswith("| ") and o.count(" | ") == 4 and not o.startswith("| step")}  # fmt: skip
    for step in selftest.STEPS:
        expected = "ok" if selftest.CPU in step.where else "not run: needs a CUDA device"
        assert statuses[step.name] == expected, (step.name, statuses)
    assert "| flux: FluxSingleTransformerBlock | 2 |" in text  # the traffic table at batch 2
    assert "| wan |" in text and "| **no** |" not in text  # every family's parity row, all within the bound
    assert "| patched + cache" in text  # the tiny main-job table


def _sleeping(seconds: float) -> tuple[bool, str]:
    time.sleep(seconds)
    return True, "slept"


def test_a_step_past_its_budget_is_cut_and_the_next_still_runs():
    steps = [selftest.Step("slow", "sleeps 30 s", 0.3, frozenset({"cpu"}), lambda: _sleeping(30)),
             selftest.Step("quick", "sleeps 0 s", 5, frozenset({"cpu"}), lambda: _sleeping(0)),
             selftest.Step("broken", "raises", 5, frozenset({"cpu"}), lambda: 1 / 0),
             selftest.Step("gpu-only", "never here", 5, frozenset({"gpu"}), lambda: _sleeping(30))]  # fmt: skip
    start = time.perf_counter()
    outcomes = selftest.run_steps(steps, "cpu", isolate=False)
    assert time.perf_counter() - start < 5
    assert [o.status for o in outcomes] == ["cut", "ok", "failed", "not run: needs a CUDA device"]
    assert "ZeroDivisionError" in outcomes[2].text
    assert "| slow | sleeps 30 s | 0.3 |" in selftest.report(outcomes, "cpu")


def test_an_isolated_command_past_its_budget_is_killed_with_its_children():
    """The child starts a grandchild that would outlive it; the budget kills the whole process group."""
    grandchild = "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
    start = time.perf_counter()
    code, out = selftest._command([sys.executable, "-c", grandchild + " print(p.pid, flush=True); p.wait()"], 3)
    assert code is None and time.perf_counter() - start < 10
    pid = int(out.split()[0])
    alive = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    assert alive in ("", "Z"), f"grandchild {pid} survived the cut ({alive})"
