"""bench.timing: interleaved rounds, the spread per path, the ratio's interval, the load, and the warnings
that say when a figure should not be trusted."""

import json
import logging
import math

import pytest
import torch

from dit_kernels.bench import timing, zoo
from dit_kernels.bench.timing import Load, Spread, Timing, measure, median_interval
from dit_kernels.log_filters import without_records

QUIET = Load(before=0.0, after=0.0, cpus=2, torch_threads=2)


def test_rounds_are_interleaved_with_the_order_rotated():
    order = []
    paths = {name: (lambda name=name: order.append(name)) for name in "abc"}
    found = measure(paths, repeats=3)
    assert order == list("abc" "bca" "cab")
    assert found.rounds == 3 and all(len(s) == 3 and min(s) >= 0 for s in found.samples.values())


def test_default_rounds_run_to_the_minimum_then_the_budget_then_stop_at_the_cap():
    calls = []
    assert measure({"a": lambda: calls.append(1)}, budget_s=0).rounds == timing.MIN_REPEATS
    assert measure({"a": lambda: calls.append(1)}, budget_s=1e9, max_repeats=7).rounds == 7
    slow = measure({"a": lambda: torch.ones(1).add_(1)}, min_repeats=1, budget_s=0.02, max_repeats=10**6)
    assert 1 < slow.rounds < 10**6 and sum(slow.samples["a"]) >= 20  # stopped once 20 ms were spent


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="no paths"):
        measure({})
    with pytest.raises(ValueError, match="repeats must be at least 1, got 0"):
        measure({"a": lambda: None}, repeats=0)


def test_spread_is_median_and_quartiles():
    spread = Spread.of([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (spread.median, spread.q1, spread.q3, spread.min, spread.max, spread.n) == (3, 2, 4, 1, 5, 5)
    assert spread.iqr_fraction == pytest.approx(2 / 3)
    assert Spread.of([7.0]).iqr_fraction == 0


def test_median_interval_is_the_order_statistics_of_the_sign_test():
    """n = 20: the 6th and 15th smallest (the textbook 95 % interval), coverage 1 - 2 P(Bin(20, 1/2) <= 5);
    below 6 values: min..max with coverage 1 - 2^(1-n)."""
    low, high, coverage = median_interval([float(v) for v in range(20, 0, -1)])
    assert (low, high) == (6, 15) and coverage == pytest.approx(1 - 2 * sum(math.comb(20, i) for i in range(6)) / 2**20)
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1, 5, 1 - 2 / 32)
    assert median_interval([2.0]) == (2, 2, 0.0)


def test_a_clear_ratio_has_no_warning_and_a_noisy_one_is_flagged():
    eager = [10.0, 10.1, 9.9, 10.0, 10.2, 9.8, 10.0, 10.1]
    clear = Timing({"eager": eager, "fast": [v / 2 for v in eager]}, QUIET)
    ratio = clear.ratio("eager", "fast")
    assert ratio.median == pytest.approx(2) and not ratio.overlaps_one() and clear.warnings("eager") == []
    noisy = Timing({"eager": eager, "other": [5.0, 16.0, 8.0, 13.0, 6.0, 15.0, 9.0, 12.0]}, QUIET)
    warnings = noisy.warnings("eager")
    assert any("other: IQR" in w and "noisy" in w for w in warnings), warnings
    assert any("other: vs eager" in w and "contains 1" in w for w in warnings), warnings
    assert noisy.noise() == pytest.approx(noisy.spread("other").iqr_fraction)


def test_a_busy_machine_and_a_single_round_are_flagged():
    busy = Timing({"eager": [1.0, 1.0], "fast": [0.5, 0.5]}, Load(before=0.5, after=3.0, cpus=2, torch_threads=2))
    assert busy.warnings("eager")[0].startswith("machine busy (load 0.50 -> 3.00 on 2 CPUs")
    once = Timing({"eager": [1.0], "fast": [0.5]}, QUIET)
    assert once.warnings("eager") == ["1 round: no spread measured, ratios are single samples"]


def test_as_dict_keeps_every_sample_the_spread_the_ratio_and_the_load():
    found = measure({"eager": lambda: None, "fast": lambda: None}, repeats=4)
    payload = json.loads(json.dumps(found.as_dict(base="eager")))
    assert payload["rounds"] == 4 and set(payload["load"]) == {"before", "after", "cpus", "torch_threads"}
    assert payload["paths"]["fast"]["samples_ms"] == found.samples["fast"]
    assert payload["paths"]["fast"]["spread_ms"]["n"] == 4 and "ratio_vs_eager" in payload["paths"]["fast"]


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_without_records_drops_only_the_matching_records_inside_the_block():
    logger, records = logging.getLogger("test_bench_timing.third_party"), Records()
    logger.addHandler(records)
    try:
        with without_records(logger.name, "does not apply"):
            logger.warning("this does not apply")
            logger.warning("this one does")
        logger.warning("outside: does not apply")
    finally:
        logger.removeHandler(records)
    assert records.messages == ["this one does", "outside: does not apply"]


def test_to_dtype_drops_diffusers_empty_fp32_list_warning():
    """diffusers' ``to(dtype)`` warns "should be kept in float32: []" for a model that keeps nothing in fp32;
    ``zoo.to_dtype`` casts without it (the plain ``to`` shows the warning is there to drop)."""
    logger, records = logging.getLogger("diffusers.models.modeling_utils"), Records()
    logger.addHandler(records)
    try:
        model = zoo.build("dit", "tiny")
        assert zoo.to_dtype(model, torch.float64) is model and next(model.parameters()).dtype == torch.float64
        assert records.messages == []
        model.to(torch.float32)
    finally:
        logger.removeHandler(records)
    assert len(records.messages) == 1 and "should be kept in float32: []" in records.messages[0]
