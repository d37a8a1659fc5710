"""Step cache (dit_kernels.cache) on bare transformers of every family with a patcher (tiny configs from
dit_kernels.bench.zoo), eager blocks (kernels=False) and fused ones (kernels=True):

- threshold 0 gives the uncached output bit for bit; a huge threshold skips every step the rules allow
  (warm-up, first estimate, longest run, final steps), with the block counts to match, and a skipped
  step returns the output extrapolated from the computed ones;
- CFG: "joint" decides on the whole batch; "per_half" decides each half on its own, and a half-batch run
  of the blocks (HunyuanDiT's long skips included) matches running each half alone;
- sequential CFG (two calls per timestep) keeps one state per branch;
- state resets (rising timestep, new shapes, reset_cache, cache_session) and no leak into a fresh call;
- ControlNet / skip-layer calls bypass the cache; unpatch restores the model exactly;
- the rule on hand-made outputs (the interval scaled by threshold / miss, prediction by the polynomial
  through the last computed steps), config checks, the 0 % warning;
- the Triton backend (interpreter) inside cached blocks.
"""

from __future__ import annotations

import logging

import pytest
import torch

import dit_kernels
from dit_kernels.bench import e2e, zoo
from dit_kernels.cache.policy import Group, decide, fit_weights
from dit_kernels.models import FAMILY_MODULES, family_named, family_of
from patch_parity import FP32_ATOL, FP32_RTOL, assert_unchanged, snapshot

FAMILIES = FAMILY_MODULES
# cfg="per_half" runs the remaining blocks on half the batch: not where the stream is reshaped between blocks
HALVES = [family for family in FAMILIES if not family_named(family).blocks.reshapes]
KERNELS = [False, True]
# Every skip the rules allow: a threshold no change reaches.
ALWAYS = dict(threshold=1e9, warmup_steps=2, max_consecutive_skips=3, final_steps_computed=2)


# One block more than the tiny configs, so that the cached remainder has blocks before its last one (SD3:
# before the context_pre_only block); HunyuanDiT: 6 layers, so a long skip leaves a cached block (1 -> 4).
DEPTH = {"dit": {"num_layers": 3}, "pixart": {"num_layers": 3}, "sd3": {"num_layers": 3}, "hunyuan": {"num_layers": 6}}


def build(family: str):
    torch.manual_seed(0)
    return zoo.build(family, **DEPTH.get(family, {}))


def inputs(family: str, model, batch: int = 2, side: int = 8, seed: int = 0) -> dict:
    return zoo.transformer_inputs(family, model, zoo.Shape(batch, side, side, 5), torch.float32, seed=seed)


def cached(model, kernels: bool = False, backend: str = "torch", **config):
    dit_kernels.patch(model, kernels=kernels, backend=backend, cache=dit_kernels.CacheConfig(**config))
    return model


def denoise(model, family: str, x: dict, steps: int, num_steps=None) -> torch.Tensor:
    """e2e's Euler loop (t 1000 -> 0) as one cache call when the model is cached."""
    if dit_kernels.patch_report(model) is None or dit_kernels.patch_report(model).cache == []:
        return e2e.denoise(model, family, x, steps)
    with dit_kernels.cache_session(model, num_steps=num_steps):
        return e2e.denoise(model, family, x, steps)


def decisions(model, call: int = -1, group: str = "batch") -> list[str]:
    trace = dit_kernels.cache_stats(model)["calls"][call]["trace"]
    return [entry["decision"] for entry in trace if entry["group"] == group]


def allowed(steps: int, warmup: int, cap: int, final: int, order: int = 1) -> list[str]:
    """The decisions the rules allow when every miss is far below the threshold: computed until the first
    miss is measured (``order + 2`` computed steps) and through warm-up, then runs of ``cap`` skips."""
    out, nodes, next_compute = [], 0, 0
    for step in range(steps):
        forced = step < warmup or step >= steps - final or step >= next_compute
        out.append("compute" if forced else "skip")
        if forced:
            next_compute = step + (cap + 1 if nodes >= order + 1 else 1)
            nodes += 1
    return out


def num_blocks(model) -> int:
    return len(family_of(model).blocks.blocks(model))


# ----------------------------------------------------------------------------------------- exactness, counts


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("family", FAMILIES)
def test_threshold_zero_is_the_uncached_output_bit_for_bit(family, kernels):
    reference = build(family)
    if kernels:
        dit_kernels.patch(reference, backend="torch")
    model = cached(build(family), kernels, threshold=0.0)
    x = inputs(family, model)
    assert torch.equal(denoise(model, family, x, 6, num_steps=6), e2e.denoise(reference, family, x, 6))
    stats = dit_kernels.cache_stats(model)
    assert stats["blocks_skipped"] == 0 and stats["hit_rate"] == 0
    assert stats["blocks_computed"] == 6 * num_blocks(model) and stats["calls"][-1]["steps"] == 6


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("family", FAMILIES)
def test_huge_threshold_skips_every_step_the_rules_allow(family, kernels):
    model = cached(build(family), kernels, **ALWAYS)
    x = inputs(family, model)
    out = denoise(model, family, x, 12, num_steps=12)
    expected = allowed(12, warmup=2, cap=3, final=2)
    assert decisions(model) == expected == ["compute"] * 3 + ["skip"] * 3 + ["compute"] + ["skip"] * 3 + ["compute"] * 2
    call, n = dit_kernels.cache_stats(model)["calls"][-1], num_blocks(model)
    computed = expected.count("compute")
    assert call["blocks_computed"] == computed * n and call["blocks_skipped"] == (12 - computed) * n
    assert call["hit_rate"] == pytest.approx((12 - computed) / 12)
    reasons = [entry["reason"] for entry in call["trace"]]
    assert reasons[:3] == ["warm-up"] * 2 + ["no estimate"] and reasons[-2:] == ["final steps"] * 2
    assert reasons[6] == "planned" and call["trace"][6]["interval"] == 4.0
    assert torch.isfinite(out).all()
    assert not torch.equal(out, e2e.denoise(build(family), family, x, 12)), "skipped steps changed nothing"


@pytest.mark.parametrize("family", FAMILIES)
def test_skipped_step_returns_the_output_extrapolated_from_the_computed_ones(family):
    """Order 1: a skipped step returns ``y_b + (y_b - y_a) (s - b) / (b - a)`` from the last two computed
    outputs (steps a < b); no block runs on it."""
    model = cached(build(family), threshold=1e9, warmup_steps=1, final_steps_computed=0)
    x = inputs(family, model)
    ran = []
    for block in family_of(model).blocks.blocks(model):
        block.register_forward_pre_hook(lambda *_: ran.append(1))
    outputs = []
    with torch.no_grad(), dit_kernels.cache_session(model):
        for step in range(5):
            zoo.set_timestep(family, x, 900.0 - 50 * step)
            before = len(ran)
            outputs.append((model(**x, return_dict=False)[0], len(ran) - before))
    assert decisions(model) == ["compute"] * 3 + ["skip"] * 2
    assert [count for _, count in outputs[3:]] == [0, 0] and outputs[0][1] == num_blocks(model)
    (y1, _), (y2, _) = outputs[1], outputs[2]
    for step in (3, 4):
        torch.testing.assert_close(outputs[step][0], y2 + (y2 - y1) * (step - 2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_skipped_step_keeps_the_calls_output_format(family):
    """``return_dict=True`` (diffusers' default): a skipped step returns the transformer's output dataclass
    with the predicted sample, equal to what the same loop returns as a tuple."""
    formats = {}
    for return_dict in (True, False):
        model = cached(build(family), threshold=1e9, warmup_steps=1, final_steps_computed=0)
        x = inputs(family, model)
        with torch.no_grad(), dit_kernels.cache_session(model):
            for step in range(4):
                zoo.set_timestep(family, x, 900.0 - 50 * step)
                formats[return_dict] = model(**x, return_dict=return_dict)
        assert decisions(model)[-1] == "skip"
    assert type(formats[True]).__name__ == "Transformer2DModelOutput" and isinstance(formats[False], tuple)
    assert torch.equal(formats[True].sample, formats[False][0])


@pytest.mark.parametrize("family", [f for f in ("dit", "flux") if f in FAMILIES])
def test_compiled_model_takes_the_same_decisions_and_outputs(family):
    """``torch.compile`` (eager backend: dynamo's tracing, no codegen) around a cached model: the cache's
    host-side decisions break the graph, nothing else changes; outputs within fp32 noise, same trace."""
    runs = {}
    for compiled in (False, True):
        model = cached(build(family), kernels=True, threshold=1e9, warmup_steps=1, final_steps_computed=0)
        call = torch.compile(model, backend="eager") if compiled else model
        x = inputs(family, model)
        with torch.no_grad(), dit_kernels.cache_session(model):
            outputs = []
            for step in range(5):
                zoo.set_timestep(family, x, 900.0 - 100 * step)
                outputs.append(call(**x, return_dict=False)[0])
        runs[compiled] = outputs, decisions(model)
    assert runs[True][1] == runs[False][1] == ["compute"] * 3 + ["skip"] * 2
    for a, b in zip(runs[True][0], runs[False][0]):
        torch.testing.assert_close(a, b, rtol=FP32_RTOL, atol=FP32_ATOL)


# ----------------------------------------------------------------------------------------- CFG


def half(family: str, x: dict, rows: slice) -> dict:
    """The transformer inputs of one CFG half: every batch-first tensor sliced (ids/RoPE tables are not)."""
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 2 else v for k, v in x.items()}


def cfg_steps(family: str, x: dict, steps: int = 6):
    """Inputs per step from the batch-2 inputs ``x``: the first half barely moves (timestep 900 - 0.01 s),
    the second gets new latents every step, so per half the first skips and the second computes."""
    generator = torch.Generator().manual_seed(3)
    for step in range(steps):
        y = dict(x)
        fresh = torch.randn(x["hidden_states"][1:].shape, generator=generator)
        y["hidden_states"] = torch.cat([x["hidden_states"][:1], fresh])
        zoo.set_timestep(family, y, 900 - 0.01 * step)
        yield y


def run_steps(model, steps_inputs) -> list[torch.Tensor]:
    with torch.no_grad(), dit_kernels.cache_session(model):
        return [model(**x, return_dict=False)[0] for x in steps_inputs]


CFG_RULES = dict(threshold=0.1, warmup_steps=1, final_steps_computed=0, max_consecutive_skips=100)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("family", HALVES)
def test_per_half_decides_each_half_like_a_run_of_that_half_alone(family, kernels):
    model = cached(build(family), kernels, cfg="per_half", **CFG_RULES)
    alone = [cached(build(family), kernels, **CFG_RULES) for _ in range(2)]
    steps = list(cfg_steps(family, inputs(family, model)))
    both = run_steps(model, steps)
    rows = (slice(0, 1), slice(1, 2))
    halves = [run_steps(m, [half(family, x, r) for x in steps]) for m, r in zip(alone, rows)]
    assert decisions(model, group="first half") == decisions(alone[0]) == ["compute"] * 3 + ["skip"] * 3
    assert decisions(model, group="second half") == decisions(alone[1]) == ["compute"] * 6
    for step, out in enumerate(both):
        expected = torch.cat([halves[0][step], halves[1][step]])
        torch.testing.assert_close(out, expected, rtol=FP32_RTOL, atol=FP32_ATOL, msg=lambda m: f"step {step}: {m}")
    # the first half's blocks ran 3 times, the second half's 6 times
    assert dit_kernels.cache_stats(model)["blocks_skipped"] == 3 * num_blocks(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_joint_decides_on_the_whole_batch(family):
    """Same inputs as the per-half test (whose halves decide differently): one decision per step, applied
    to both halves: a computed step is eager's output in both rows, a skipped one predicts both."""
    model, eager = cached(build(family), **dict(CFG_RULES, threshold=1e9)), build(family)
    steps = list(cfg_steps(family, inputs(family, model)))
    outputs = run_steps(model, steps)
    with torch.no_grad():
        truth = [eager(**x, return_dict=False)[0] for x in steps]
    trace = dit_kernels.cache_stats(model)["calls"][-1]["trace"]
    assert [e["group"] for e in trace] == ["batch"] * 6 and "skip" in decisions(model)
    for decision, out, expected in zip(decisions(model), outputs, truth):
        exact = [torch.equal(out[row], expected[row]) for row in range(2)]
        assert exact == [decision == "compute"] * 2, (decision, exact)


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_cfg_keeps_one_state_per_branch(family):
    """Two transformer calls per timestep (cond, then uncond with other inputs): branch 1 behaves like a
    run of the uncond calls alone."""
    model = cached(build(family), **ALWAYS)
    alone = cached(build(family), **ALWAYS)
    cond, uncond = inputs(family, model, seed=0), inputs(family, model, seed=1)
    calls, uncond_calls = [], []
    for step in range(6):
        for x in (cond, uncond):
            y = dict(x)
            zoo.set_timestep(family, y, 900 - 100 * step)
            calls.append(y)
        uncond_calls.append(calls[-1])
    both, only = run_steps(model, calls), run_steps(alone, uncond_calls)
    for a, b in zip(both[1::2], only):
        assert torch.equal(a, b)
    trace = dit_kernels.cache_stats(model)["calls"][-1]["trace"]
    assert [e["branch"] for e in trace] == [0, 1] * 6 and dit_kernels.cache_stats(model)["calls"][-1]["steps"] == 6


# ----------------------------------------------------------------------------------------- state


@pytest.mark.parametrize("family", FAMILIES)
def test_no_state_leaks_into_the_next_loop(family):
    """Loop 1, then loop 2 with another seed (and resolution where the family takes one) on the same
    cached model: loop 2 equals loop 2 on a freshly cached model, whether the reset comes from
    cache_session, reset_cache, a new shape or the rising timestep."""
    side = 8 if family == "dit" else 6  # DiT takes its configured square size only
    model = cached(build(family), **ALWAYS)
    first, second = inputs(family, model, seed=0), inputs(family, model, side=side, seed=1)
    fresh = e2e.denoise(cached(build(family), **ALWAYS), family, second, 8)
    e2e.denoise(model, family, first, 8)  # no session: the next loop's rising timestep / new shape resets
    assert torch.equal(e2e.denoise(model, family, second, 8), fresh)
    dit_kernels.reset_cache(model)
    assert torch.equal(e2e.denoise(model, family, second, 8), fresh)
    with dit_kernels.cache_session(model, num_steps=8):
        e2e.denoise(model, family, first, 4)  # an interrupted loop
    assert torch.equal(e2e.denoise(model, family, second, 8), fresh)
    calls = dit_kernels.cache_stats(model)["calls"]
    assert [c["steps"] for c in calls] == [8, 8, 8, 4, 8]
    assert [c["num_steps"] for c in calls] == [None, None, None, 8, None]


def test_rising_timestep_and_new_shape_start_a_new_call():
    family = FAMILIES[0]
    model = cached(build(family), **ALWAYS)
    x = inputs(family, model)
    with torch.no_grad():
        for t, batch in ((900, 2), (800, 2), (900, 2), (800, 1)):
            y = inputs(family, model, batch=batch) if batch != 2 else dict(x)
            zoo.set_timestep(family, y, t)
            model(**y, return_dict=False)
    assert [c["steps"] for c in dit_kernels.cache_stats(model)["calls"]] == [2, 1, 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_the_model_and_drops_the_state(family):
    model = build(family)
    before = snapshot(model)
    cached(model, kernels=True, **ALWAYS)
    x = inputs(family, model)
    denoise(model, family, x, 4)
    dit_kernels.unpatch(model)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="not patched with a step cache"):
        dit_kernels.cache_stats(model)
    cached(model, **ALWAYS)
    assert dit_kernels.cache_stats(model)["calls"] == []


BYPASS = {"sd3": lambda: {"skip_layers": [1]}, "flux": lambda: {"controlnet_block_samples": [torch.randn(2, 64, 32)]}}


@pytest.mark.parametrize("family", [f for f in BYPASS if f in FAMILIES])
def test_controlnet_and_skip_layer_calls_bypass_the_cache(family):
    model, eager = cached(build(family), **ALWAYS), build(family)
    x, extra = inputs(family, model), BYPASS[family]()
    with torch.no_grad():
        ours, theirs = (m(**x, **extra, return_dict=False)[0] for m in (model, eager))
    assert torch.equal(ours, theirs)
    call = dit_kernels.cache_stats(model)["calls"][-1]
    assert call["bypassed_calls"] == 1 and call["trace"] == [] and call["blocks_computed"] == num_blocks(model)


# ----------------------------------------------------------------------------------------- rules


def run_rule(config, outputs, num_steps=None) -> list[tuple[bool, str]]:
    """``decide`` over hand-made outputs, a computed step handing its output to the group."""
    group, out = Group("batch", slice(None)), []
    for step, output in enumerate(outputs):
        d = decide(config, group, step, num_steps)
        if d.compute:
            group.computed(config, step, output)
        out.append((d.compute, d.reason))
    return out


RULE = dict(warmup_steps=0, final_steps_computed=0, max_consecutive_skips=20)


def test_interval_scales_by_threshold_over_miss():
    """Outputs 0, 1, then 2 + delta at step 2: the linear prediction 2 misses by delta / (2 + delta); the
    interval (1) becomes threshold / miss, floored to the next computed step, within [1, cap + 1]."""
    config = dit_kernels.CacheConfig(threshold=0.1, **RULE)
    for delta, interval in ((0.05, 0.1 * 2.05 / 0.05), (0.5, 1.0), (0.0, 21.0)):
        group = Group("batch", slice(None))
        for step, value in enumerate((0.0, 1.0, 2.0 + delta)):
            assert decide(config, group, step, None).compute
            miss = group.computed(config, step, torch.full((2, 3), value))
        assert miss == pytest.approx(delta / (2 + delta))
        assert group.interval == pytest.approx(interval) and group.next_compute == 2 + int(interval)
    grown = Group("batch", slice(None), interval=3.0)
    grown.nodes = [policy_node(0, 0.0), policy_node(3, 3.0)]
    grown.computed(config, 6, torch.full((2, 3), 6.3))  # miss 0.3 / 6.3 at distance 3: interval 3 * 2.1
    assert grown.interval == pytest.approx(3 * 0.1 / (0.3 / 6.3)) and grown.next_compute == 12


def policy_node(step: int, value: float):
    from dit_kernels.cache.policy import Node

    return Node(step, torch.full((2, 3), value))


def test_a_prediction_that_holds_lengthens_the_skip_run_and_one_that_misses_shortens_it():
    """Outputs on a line are extrapolated exactly: after the first estimate, runs of the longest length;
    outputs that jump every step (miss ~ 1) compute every step."""
    config = dit_kernels.CacheConfig(threshold=0.05, **dict(RULE, max_consecutive_skips=4))
    line = run_rule(config, [torch.full((3,), 1.0 + step) for step in range(13)])
    assert [c for c, _ in line] == [True] * 3 + [False] * 4 + [True] + [False] * 4 + [True]
    assert [r for _, r in line[:3]] == ["no estimate"] * 3 and line[7][1] == "planned"
    jumps = run_rule(config, [torch.full((3,), float((-2) ** step)) for step in range(8)])
    assert all(c for c, _ in jumps) and [r for _, r in jumps][3:] == ["planned"] * 5


def test_final_steps_need_the_step_count():
    config = dit_kernels.CacheConfig(threshold=1.0, warmup_steps=0, final_steps_computed=2, max_consecutive_skips=9)
    outputs = [torch.full((3,), float(step)) for step in range(6)]
    assert [r for _, r in run_rule(config, outputs, 6)] == ["no estimate"] * 3 + ["planned skip"] + ["final steps"] * 2
    assert [r for _, r in run_rule(config, outputs)] == ["no estimate"] * 3 + ["planned skip"] * 3


def test_threshold_zero_never_plans_a_skip():
    config = dit_kernels.CacheConfig(threshold=0.0, **RULE)
    assert all(c for c, _ in run_rule(config, [torch.full((3,), 1.0 + step) for step in range(8)]))


def test_prediction_is_the_polynomial_fit_to_the_last_computed_steps():
    """Weights on uneven steps: exact for polynomials of the fit's degree (through the nodes, or least
    squares over more); the group keeps the last fit_steps computed steps and predicts from them."""
    assert fit_weights([7], 9, order=2) == [1.0]
    assert fit_weights([2, 4], 5, order=1) == pytest.approx([-0.5, 1.5])
    assert fit_weights([3, 4], 9, order=0) == pytest.approx([0.5, 0.5])  # least squares of degree 0: the mean
    for nodes, order in (([1, 2, 5], 2), ([0, 1, 3, 6], 1), ([0, 1, 3, 6, 7], 2)):
        for power in range(order + 1):
            got = sum(w * t**power for w, t in zip(fit_weights(nodes, 9, order), nodes))
            assert got == pytest.approx(9**power), (nodes, order, power)
    config = dit_kernels.CacheConfig(threshold=0.1, fit_steps=2)
    group = Group("batch", slice(None))
    for step in (0, 2, 4):
        group.computed(config, step, torch.tensor([1.0 + step], dtype=torch.bfloat16))
    assert [n.step for n in group.nodes] == [2, 4]
    predicted = group.predicted(5, order=1)
    assert predicted.item() == pytest.approx(6.0) and predicted.dtype == torch.bfloat16
    assert predicted.data_ptr() != group.nodes[-1].output.data_ptr()


@pytest.mark.parametrize("family", FAMILIES)
def test_fit_changes_skipped_steps_only(family):
    """Forced decisions (a threshold no miss reaches) are the same for a fit through two computed steps and
    a least-squares fit over three; only skipped steps' outputs differ."""
    plain, extra = cached(build(family), fit_steps=2, **ALWAYS), cached(build(family), fit_steps=3, **ALWAYS)
    x = inputs(family, plain)
    a, b = denoise(plain, family, x, 7, 7), denoise(extra, family, x, 7, 7)
    assert decisions(plain) == decisions(extra) == allowed(7, warmup=2, cap=3, final=2)
    assert not torch.equal(a, b)


def test_config_checks_and_refusals_change_nothing():
    assert dit_kernels.cache.as_config(0.1) == dit_kernels.CacheConfig(threshold=0.1)
    for bad in (dict(threshold=-1.0), dict(threshold=float("nan")), dict(warmup_steps=-1), dict(warmup_steps=True),
                dict(max_consecutive_skips=0), dict(final_steps_computed=1.5), dict(cfg="halves"),
                dict(order=-1), dict(order=True), dict(fit_steps=1)):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            dit_kernels.CacheConfig(**bad)
    with pytest.raises(TypeError, match="threshold"):
        dit_kernels.CacheConfig(threshold="0.1")
    model = build(FAMILIES[0])
    before = snapshot(model)
    with pytest.raises(TypeError, match="cache must be"):
        dit_kernels.patch(model, cache="fast")
    assert_unchanged(model, before)
    report = dit_kernels.patch(model, cache=0.1)
    assert "CacheConfig(threshold=0.1" in repr(report) and repr(report).splitlines()[-1].startswith("eager fallback")


def test_zero_hit_rate_warns_once(caplog):
    family = FAMILIES[0]
    model = cached(build(family), threshold=1e-12, warmup_steps=0, final_steps_computed=0)
    x = inputs(family, model)
    with caplog.at_level(logging.WARNING, logger="dit_kernels"):
        denoise(model, family, x, 14)  # 3 steps before the first estimate, then 11 planned
        denoise(model, family, x, 14)
    warnings = [r for r in caplog.records if "0 % hit rate" in r.getMessage()]
    assert len(warnings) == 1 and dit_kernels.cache_stats(model)["hit_rate"] == 0


# ----------------------------------------------------------------------------------------- Triton


@pytest.mark.parametrize("family", [f for f in ("dit", "flux") if f in FAMILIES])
def test_triton_backend_inside_cached_blocks(family):
    """The interpreter is slow: 4 steps. Threshold 0 is bitwise the uncached patched output; a huge
    threshold skips and stays within fp32 noise of the torch-backend cached run."""
    reference = build(family)
    dit_kernels.patch(reference, backend="triton")
    exact = cached(build(family), kernels=True, backend="triton", threshold=0.0)
    x = inputs(family, reference)
    assert torch.equal(denoise(exact, family, x, 4), e2e.denoise(reference, family, x, 4))
    rules = dict(ALWAYS, warmup_steps=1, final_steps_computed=1, order=0, fit_steps=1)  # first estimate at step 1
    triton = cached(build(family), kernels=True, backend="triton", **rules)
    torch_ = cached(build(family), kernels=True, backend="torch", **rules)
    a, b = denoise(triton, family, x, 4, 4), denoise(torch_, family, x, 4, 4)
    assert decisions(triton) == decisions(torch_) == ["compute", "compute", "skip", "compute"]
    torch.testing.assert_close(a, b, rtol=FP32_RTOL, atol=FP32_ATOL)
