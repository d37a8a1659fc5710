"""The main job on the trained built-in models (dit_kernels.bench.trained): every row generates, counts
its block evaluations and measures quality; the CLI (``python -m dit_kernels.bench`` with no --config)
writes the table, a grid per row and the quality-vs-cost plot. Few steps, small batches: the interest is
the plumbing, not the figures."""

from __future__ import annotations

import math

import pytest
import torch

from dit_kernels.bench import builtin, trained
from dit_kernels.bench.__main__ import main as bench_main
from dit_kernels.cache import CacheConfig

SETTING = dict(batch=4, steps=6)


@pytest.fixture(scope="module")
def dit():
    return builtin.load("digits-dit")


def test_rows_count_blocks_like_first_block_cache(dit):
    """Uncached rows evaluate every block every step; a threshold-0 step cache is exact with the same
    count; a cache that skips evaluates no block on a skipped step; diffusers' caches are counted
    from the attention calls that ran (FirstBlockCache at threshold 0 computes everything)."""
    setting = trained.Setting("digits-dit", **SETTING)
    blocks = len(trained.blocks_of(dit.transformer)) * setting.steps
    rows = [trained.uncached_row("eager", dit, setting),
            trained.step_cache_row("exact", dit, setting, CacheConfig(threshold=0.0)),
            trained.step_cache_row("skipping", dit, setting, CacheConfig(threshold=1e9, warmup_steps=1,
                                                                          final_steps_computed=1)),
            trained.diffusers_row("fbc 0", dit, trained.first_block_cache(0.0)),
            trained.diffusers_row("taylorseer 2", dit, trained.taylorseer(2, 1))]  # fmt: skip
    truth = rows[0].generate(setting)
    got = {row.label: trained.quality(row, setting, row.generate(setting), truth) for row in rows}
    assert got["eager"]["block evals"] == got["exact"]["block evals"] == got["fbc 0"]["block evals"] == blocks
    assert math.isinf(got["exact"]["PSNR (dB)"]) and math.isinf(got["fbc 0"]["PSNR (dB)"])
    # steps 0-2 computed (warm-up, then until the first miss is measured), 3-4 skipped, 5 final
    assert got["skipping"]["block evals"] == 4 * blocks / setting.steps
    assert got["skipping"]["fewer evals"] > 1 and math.isfinite(got["skipping"]["PSNR (dB)"])
    assert blocks / 2 <= got["taylorseer 2"]["block evals"] < blocks
    for row in got.values():
        assert 0 <= row["accuracy %"] <= 100


def test_cache_dit_row_skips_blocks_and_resets_between_loops(dit):
    """The optional cache-dit row (DBCache F1B0 + TaylorSeer): exact at threshold 0; at an unreachable
    threshold, the warm-up steps compute every block and later steps only the first; the same images and
    count on a second loop (its state reset)."""
    pytest.importorskip("cache_dit")
    setting = trained.Setting("digits-dit", **SETTING)
    per_step = len(trained.blocks_of(dit.transformer))
    truth = trained.uncached_row("eager", dit, setting).generate(setting)
    exact = trained.cache_dit_row("cache-dit 0", dit, setting, 0.0)
    assert math.isinf(trained.quality(exact, setting, exact.generate(setting), truth)["PSNR (dB)"])
    assert exact.evaluations() == per_step * setting.steps
    row = trained.cache_dit_row("cache-dit 1e9", dit, setting, 1e9, order=1, warmup=2)
    images = row.generate(setting)
    got = trained.quality(row, setting, images, truth)
    assert got["block evals"] == 2 * per_step + (setting.steps - 2) < per_step * setting.steps
    assert math.isfinite(got["PSNR (dB)"]) and got["fewer evals"] > 1
    assert torch.equal(row.generate(setting), images) and row.evaluations() == got["block evals"]


def test_recognisable_uncached_samples(dit):
    """A few samples at few steps are already mostly the requested digit (the full check is the model card)."""
    images = builtin.sample(dit, torch.arange(10), steps=10, generator=torch.Generator().manual_seed(0))
    assert (builtin.classify(images) == torch.arange(10)).float().mean() >= 0.6


def test_curve_names_group_sweep_rows():
    assert trained.family("step cache 0.15") == "step cache"
    assert trained.family("cache-dit DBCache F1B0 + TaylorSeer 0.12") == "cache-dit DBCache F1B0 + TaylorSeer"
    assert trained.family("TaylorSeer 4 order 2") == "TaylorSeer order 2"
    assert trained.family("FirstBlockCache 0.05") == "FirstBlockCache"


def test_default_bench_is_the_trained_run_and_writes_grids_and_plot(tmp_path, capsys):
    bench_main(["--model", "digits-dit", "--batch", "4", "--steps", "3", "--repeats", "1", "--out", str(tmp_path)])
    table = capsys.readouterr().out
    for row in ("eager diffusers", "patched", "patched + step cache (default)", "diffusers FirstBlockCache",
                "diffusers TaylorSeer"):  # fmt: skip
        assert f"| {row}" in table
    grids = sorted(p.name for p in tmp_path.glob("grid_digits-dit_*.png"))
    assert len(grids) == 5 and (tmp_path / "quality_vs_cost.png").stat().st_size > 0
    assert (tmp_path / "results.md").read_text().strip() in table
