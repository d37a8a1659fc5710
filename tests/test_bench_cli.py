"""The README's main job (``python -m dit_kernels.bench``) end to end on a tiny config, and the launch
model behind the issue's targets (fused blocks issue at most a quarter of eager's non-GEMM launches)."""

import json

import pytest

from dit_kernels.bench import traffic
from dit_kernels.bench.__main__ import main


def test_main_job_writes_table_json_and_plot(tmp_path, capsys):
    main(["--model", "flux", "--config", "tiny", "--size", "64", "--steps", "2", "--repeats", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "device: CPU" in printed and "| eager diffusers |" in printed and "| patched |" in printed
    payload = json.loads((tmp_path / "results.json").read_text())
    eager, patched = payload["rows"]
    assert eager["vs eager"] == 1.0 and patched["ms/step"] > 0
    assert patched["max-abs vs fp32"] < 1e-4, "fp32 patched loop must track the fp32 eager loop"
    assert (tmp_path / "results.md").read_text().startswith("device: CPU")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in printed
    else:
        assert (tmp_path / "results.png").stat().st_size > 0


@pytest.mark.parametrize("family", ["flux"])  # SD3 joins when its patcher lands
def test_patched_blocks_launch_at_most_a_quarter_of_eager_non_gemm_kernels(family):
    eager, patched = traffic.family_counts(family)
    assert eager.keys() == patched.keys()
    for kind in eager:
        assert patched[kind].launches["gemm"] == eager[kind].launches["gemm"], f"{kind}: GEMMs must not change"
        assert patched[kind].launches["other"] <= 0.25 * eager[kind].launches["other"], (
            f"{family} {kind}: {patched[kind].launches['other']} non-GEMM launches vs eager's "
            f"{eager[kind].launches['other']} ({dict(patched[kind].ops)})"
        )
