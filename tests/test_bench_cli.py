"""The README's main job (``python -m dit_kernels.bench``) end to end on a tiny config, and the launch
model behind the issue's targets (fused blocks issue at most a quarter of eager's non-GEMM launches)."""

import json

import pytest

import dit_kernels
from dit_kernels.bench import timing, traffic
from dit_kernels.bench.__main__ import main
from test_cache import allowed


def test_main_job_writes_table_json_and_plot(tmp_path, capsys):
    main(["--model", "flux", "--config", "tiny", "--size", "64", "--steps", "2", "--repeats", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "device: CPU" in printed and "| eager diffusers |" in printed and "| patched |" in printed
    assert "| IQR % | vs eager | vs eager interval |" in printed and "repeats: 1 rounds" in printed
    assert "- patched ops: norm = " in printed and "{" not in printed, "the ops line is words, not a dict"
    assert "- warning: 1 round: no spread measured" in printed
    payload = json.loads((tmp_path / "results.json").read_text())
    eager, patched, cached = payload["rows"]  # by default a cache row at the default threshold
    assert cached["path"] == f"patched + cache {dit_kernels.CacheConfig().threshold:g}"
    assert eager["vs eager"] == 1.0 and patched["ms/step"] > 0 and cached["blocks evaluated"] > 0
    ran, asked = payload["setting"], payload["requested"]
    assert (ran["device"], ran["dtype"], ran["config"], ran["rounds"]) == ("cpu", "float32", "tiny", 1)
    assert asked["device"] is None and asked["dtype"] is None, "requested: the command line as given"
    assert ran["ops"]["norm"].startswith("torch") and set(payload["timing"]["load"]) >= {"before", "after", "cpus"}
    assert [len(payload["timing"]["paths"][row["path"]]["samples_ms"]) for row in payload["rows"]] == [1, 1, 1]
    assert patched["max-abs vs fp32"] < 1e-4, "fp32 patched loop must track the fp32 eager loop"
    assert (tmp_path / "results.md").read_text().startswith("device: CPU")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in printed
    else:
        assert (tmp_path / "results.png").stat().st_size > 0


def test_cache_none_leaves_the_cache_row_out_and_default_rounds_reach_the_minimum(capsys):
    """No --repeats: at least timing.MIN_REPEATS rounds (--budget 0: exactly that many), an interval per row."""
    main(["--model", "dit", "--config", "tiny", "--steps", "2", "--budget", "0", "--cache", "none"])
    printed = capsys.readouterr().out
    assert "patched + cache" not in printed and f"repeats: {timing.MIN_REPEATS} rounds" in printed
    assert "with probability 94%" in printed  # 5 rounds: the interval is min..max, covering 1 - 2/32


def allowed_skips(steps: int, config: dit_kernels.CacheConfig) -> str:
    """The decisions of a call whose every step may skip (``test_cache.allowed``; c computed, s skipped)."""
    decisions = allowed(steps, config.warmup_steps, config.max_consecutive_skips, config.final_steps_computed,
                        config.order)  # fmt: skip
    return "".join(d[0] for d in decisions)


def test_cache_rows_report_blocks_evaluated_and_quality(tmp_path, capsys):
    """``--cache 0,1e9``: threshold 0 computes every block and matches patched exactly; a huge threshold
    skips what the default rules allow (``allowed_skips``)."""
    main(["--model", "dit", "--config", "tiny", "--steps", "10", "--repeats", "1", "--cache", "0,1e9",
          "--out", str(tmp_path)])  # fmt: skip
    printed = capsys.readouterr().out
    trace = allowed_skips(10, dit_kernels.CacheConfig())
    assert "| patched + cache 0 |" in printed and f"steps {trace} (c computed" in printed and "s" in trace
    _, patched, exact, skipping = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert exact["blocks evaluated"] == patched["blocks evaluated"] == 10 * 2
    assert exact["max-abs vs fp32"] == patched["max-abs vs fp32"]
    assert skipping["blocks evaluated"] == 2 * trace.count("c")  # no block on a skipped step
    assert 0 < skipping["max-abs vs fp32"] < 1 and skipping["PSNR vs fp32 (dB)"] > 20


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_patched_blocks_launch_at_most_a_quarter_of_eager_non_gemm_kernels(family):
    eager, patched = traffic.family_counts(family)
    assert eager.keys() == patched.keys()
    for kind in eager:
        more_gemms = patched[kind].launches["gemm"] - eager[kind].launches["gemm"]
        assert more_gemms in (0, 1), f"{kind}: the GEMMs as eager's (FLUX single blocks: proj_out split in two)"
        assert patched[kind].launches["other"] <= 0.25 * eager[kind].launches["other"], (
            f"{family} {kind}: {patched[kind].launches['other']} non-GEMM launches vs eager's "
            f"{eager[kind].launches['other']} ({dict(patched[kind].ops)})"
        )
