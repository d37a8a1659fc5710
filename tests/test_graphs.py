"""The CUDA-graph runner (dit_kernels.graphs).

On CPU the runner runs on ``EagerReplayBackend`` (capture records the forward and its output tensors,
replay re-runs it into them), which proves everything but the recording itself: keys, static-buffer
copy-in and clone/alias-out, LRU eviction and byte accounting, recapture on a new resolution or batch,
capture failure falling back to eager with the reason in the PatchReport, recapture after a LoRA
injection, torch.compile passing through, every family's pipeline replayed every step, the step cache
around the recordings (cfg="joint": the whole forward replayed on computed steps only; cfg="per_half": one
recording per block, a half batch captured as another layout), and the host-sync audit of every family's
forward (strict mode). The tests marked ``gpu`` capture real CUDA graphs (``CudaGraphBackend``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json

import pytest
import torch
from torch import nn

import dit_kernels
import tiny_pipelines
from dit_kernels import graphs
from dit_kernels.bench import zoo
from dit_kernels.bench.__main__ import main as bench_main
from dit_kernels.bench.e2e import denoise
from dit_kernels.cache.config import CFG_MODES
from dit_kernels.graphs import EagerReplayBackend, GraphConfig, GraphRunner, graph_runners
from dit_kernels.graphs import runner as graph_runner_module
from dit_kernels.graphs.tree import describe
from dit_kernels.models import FAMILY_MODULES, family_named, family_of
from dit_kernels.patching import OpBackends, Patcher
from patch_parity import FP32_ATOL, FP32_RTOL, forward
from test_cache import cfg_steps
from test_pipelines import CASES, run
from tolerances import assert_within_eager_bound

# The runner on CPU: patch(..., cuda_graphs=REPLAY) graphs with the eager replay backend, strict host-sync audit.
REPLAY = GraphConfig(backend=EagerReplayBackend(strict=True))

# diffusers' DPMSolver (PixArt's pipeline) builds its sigmas with np.array(tensor), which numpy 2 flags.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")


class Toy(nn.Module):
    """A forward with the argument kinds diffusers transformers take: a tensor, an optional tensor, a
    Python scalar, a nested dict/tuple of tensors, ``return_dict``."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x, mask=None, scale=1.0, extra=None, return_dict=True):
        y = self.proj(x) * scale
        if mask is not None:
            y = y * mask
        if extra is not None:
            cos, sin = extra["rope"]
            y = y * cos + sin
        return {"sample": y} if return_dict else (y, x.sum())


def toy_runner(**config) -> tuple[Toy, GraphRunner, list[str]]:
    torch.manual_seed(0)
    toy, reported = Toy().eval(), []
    runner = GraphRunner(toy.forward, EagerReplayBackend(), GraphConfig(**config), reported.append, module=toy)
    return toy, runner, reported


def leaves(out) -> list:
    return list(out.values()) if isinstance(out, dict) else list(out)


@torch.no_grad()
def test_key_handling_shapes_optionals_scalars_nested_and_flags():
    toy, runner, _ = toy_runner(max_keys=32)
    x, mask = torch.randn(2, 3, 4), torch.rand(2, 3, 1)
    rope = {"rope": (torch.randn(3, 4), torch.randn(3, 4))}
    calls = [dict(x=x), dict(x=x * 2), dict(x=x, mask=mask), dict(x=x, scale=2.0), dict(x=x, scale=2),
             dict(x=x, scale=True), dict(x=x, extra=rope), dict(x=x, return_dict=False), dict(x=torch.randn(1, 3, 4)),
             dict(x=torch.randn(3, 2, 4).transpose(0, 1)), dict(x=x.double())]  # fmt: skip
    # x * 2 has the same layout: replayed, not captured; the transposed x differs only in its strides
    expected_captures = [1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    for kwargs, captures in zip(calls, expected_captures):
        if kwargs["x"].dtype == torch.float64:
            toy.double()
        got, want = runner(**kwargs), toy(**kwargs)
        assert runner.stats["captures"] == captures, kwargs.keys()
        assert type(got) is type(want)
        assert all(torch.equal(g, w) for g, w in zip(leaves(got), leaves(want), strict=True))
    assert runner.stats["replays"] == len(calls) and not runner.failed


@torch.no_grad()
def test_static_inputs_are_copies_and_outputs_are_clones():
    toy, runner, _ = toy_runner()
    x1, x2 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    y1 = runner(x1, return_dict=False)[0]
    assert runner.backend.calls == 4, "2 warm-up runs, the capture, the replay"
    want1 = toy(x1.clone(), return_dict=False)[0]
    x1.add_(100.0)  # the caller reusing its input buffer must not reach the recording
    y2 = runner(x2, return_dict=False)[0]
    assert torch.equal(y1, want1), "a replay rewrote an earlier (cloned) output"
    assert torch.equal(y2, toy(x2, return_dict=False)[0]), "inputs were not copied into the static buffers"
    assert runner.backend.calls == 5 and runner.stats["captures"] == 1
    static = runner._entries[runner.keys[0]]
    assert all(s.data_ptr() not in (x1.data_ptr(), x2.data_ptr()) for s in static.inputs)
    assert y2.data_ptr() != static.outputs[0].data_ptr()


@torch.no_grad()
def test_alias_outputs_returns_the_static_buffers_which_the_next_replay_overwrites():
    toy, runner, _ = toy_runner(alias_outputs=True)
    x1, x2 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    y1 = runner(x1)["sample"]
    assert torch.equal(y1, toy(x1)["sample"])
    y2 = runner(x2)["sample"]
    assert y2 is y1, "aliasing returns the same static tensor each replay"
    assert torch.equal(y1, toy(x2)["sample"]), "the earlier result now holds the latest replay (documented)"


@torch.no_grad()
def test_lru_eviction_memory_accounting_and_recapture():
    toy, runner, _ = toy_runner(max_keys=2)
    xs = {n: torch.randn(n, 3, 4) for n in (1, 2, 3)}
    for n in (1, 2, 1, 3):  # 1 becomes most recent again, so 3 evicts 2
        runner(xs[n], return_dict=False)
    assert [describe(key[0]) for key in runner.keys] == ["[1, 3, 4] float32", "[3, 3, 4] float32"]
    assert runner.stats["evictions"] == 1 and runner.stats["captures"] == 3
    # Accounted bytes: static inputs (x) + static outputs (y and x.sum()), for the two kept keys.
    itemsize = 4
    assert runner.nbytes == sum(itemsize * (n * 12 + n * 12 + 1) for n in (1, 3))
    runner(xs[2], return_dict=False)  # evicted earlier: captured again, evicting 1
    assert runner.stats["captures"] == 4 and runner.stats["evictions"] == 2
    assert torch.equal(runner(xs[3], return_dict=False)[0], toy(xs[3], return_dict=False)[0])
    runner.config.max_bytes = 1
    runner(xs[1], return_dict=False)
    assert [describe(key[0]) for key in runner.keys] == ["[1, 3, 4] float32"], "a byte cap keeps the newest"
    runner.reset()
    assert runner.keys == [] and runner.nbytes == 0


@torch.no_grad()
def test_a_key_that_changes_every_call_switches_capturing_off():
    """A Python scalar that changes each call (here ``scale``) makes every call a new key: after 2 x max_keys
    single-use recordings the runner stops capturing, releases everything and says why."""
    toy, runner, reported = toy_runner(max_keys=2)
    x = torch.randn(2, 3, 4)
    for scale in range(1, 8):
        assert torch.equal(runner(x, scale=float(scale))["sample"], toy(x, scale=float(scale))["sample"])
    assert runner.stats["captures"] == 6 and runner.stats["eager"] == 2 and runner.keys == []
    assert runner.disabled and reported == [runner.disabled]
    assert "4 recordings were evicted after a single use" in reported[0]
    runner.reset()
    runner(x)
    runner(x)
    assert runner.stats["captures"] == 7 and runner.stats["replays"] == 7 and not runner.disabled


@torch.no_grad()
def test_a_module_or_parameter_assigned_anywhere_makes_the_runner_capture_afresh():
    toy, runner, _ = toy_runner()
    x = torch.randn(2, 3, 4)
    runner(x)
    nn.ModuleList([nn.Linear(4, 4)])[:1]  # modules registered elsewhere (a slice in a forward): no effect
    runner(x)
    assert runner.stats["captures"] == 1
    toy.proj = nn.Linear(4, 4)  # a module swap (what peft does to inject LoRA layers)
    assert torch.equal(runner(x)["sample"], toy(x)["sample"])
    toy.proj.weight = nn.Parameter(torch.zeros(4, 4))  # a new parameter tensor
    assert torch.equal(runner(x)["sample"], toy(x)["sample"])
    assert runner.stats["invalidations"] == 2 and runner.stats["captures"] == 3 and len(runner.keys) == 1
    with torch.no_grad():
        toy.proj.weight.fill_(1.0)  # in place: the recording reads it, nothing to do
    assert torch.equal(runner(x)["sample"], toy(x)["sample"]) and runner.stats["captures"] == 3


@torch.no_grad()
def test_capture_failure_falls_back_to_eager_once_with_the_reason():
    class Syncing(Toy):
        def forward(self, x, **kwargs):
            if x.sum() > 0:  # bool(tensor): a host sync, which a CUDA graph cannot capture
                x = x + 1
            return super().forward(x, **kwargs)

    torch.manual_seed(0)
    toy, reported = Syncing().eval(), []
    runner = GraphRunner(toy.forward, EagerReplayBackend(strict=True), on_fallback=reported.append)
    x = torch.randn(2, 3, 4)
    for _ in range(3):
        assert torch.equal(runner(x)["sample"], toy(x)["sample"])
    assert runner.stats["failures"] == 1 and runner.stats["eager"] == 3 and runner.keys == []
    assert len(reported) == 1 and "capture failed (HostSyncError" in reported[0] and "[2, 3, 4] float32" in reported[0]


@torch.no_grad()
def test_calls_that_cannot_be_keyed_run_eagerly():
    class Half:  # an argument of a type the key cannot hold by value
        def __rmul__(self, t):
            return t * 0.5

    toy, runner, reported = toy_runner()
    x = torch.randn(2, 3, 4)
    assert torch.equal(runner(x, scale=Half())["sample"], toy(x, scale=0.5)["sample"])
    with torch.enable_grad():
        assert runner(x)["sample"].requires_grad
    assert runner.stats["eager"] == 2 and len(reported) == 2
    assert "not a tensor, a container or a constant" in reported[0] and "autograd is enabled" in reported[1]


def flux_model() -> nn.Module:
    torch.manual_seed(0)
    return zoo.build("flux", "tiny")


def test_patch_option_on_cpu_reports_or_leaves_the_forward_alone():
    model = flux_model()
    report = dit_kernels.patch(model, backend="torch", cuda_graphs=True)
    assert any("CUDA graphs: unavailable" in item and "cpu" in item for item in report.fallbacks), report
    assert graph_runners(model) == {} and "forward" not in model.__dict__
    dit_kernels.unpatch(model)
    for option in ("auto", False):
        report = dit_kernels.patch(model, backend="torch", cuda_graphs=option)
        assert not any("CUDA graphs" in item for item in report.fallbacks) and graph_runners(model) == {}
        dit_kernels.unpatch(model)


def test_apply_on_cuda_graphs_the_forward_or_each_cached_block_and_refuses_hooked_forwards():
    """``graphs.apply`` as patch calls it for a CUDA model (installing touches no CUDA API): the whole
    forward, or with the step cache's cfg="per_half" one runner per block it wraps; a hooked forward is
    refused with the reason."""
    cuda = torch.device("cuda")
    model, patcher = flux_model(), Patcher(OpBackends("torch", "torch"))
    patcher.name_modules(model)
    runners = graphs.apply(model, patcher, "auto", cuda)
    assert list(runners) == ["forward"] and model.__dict__["forward"] is runners["forward"]
    assert graph_runners(model) == runners and isinstance(runners["forward"].backend, graphs.CudaGraphBackend)
    patcher.undo()
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    runners = graphs.apply(model, patcher, True, cuda, cached_blocks=blocks)
    assert list(runners) == [f"{kind}transformer_blocks.{i}" for kind in ("", "single_") for i in (0, 1)]
    assert [b.__dict__["forward"] for b in blocks] == list(runners.values()) and "forward" not in model.__dict__
    assert len({id(r.backend) for r in runners.values()}) == 1, "one backend, hence one memory pool, for all"
    patcher.undo()
    assert graph_runners(model) == {} and not any("forward" in b.__dict__ for b in blocks)
    model.forward = lambda *args, **kwargs: None  # an accelerate-style hook
    assert graphs.apply(model, patcher, True, cuda) == {}
    assert "forward is wrapped by a hook" in patcher.fallbacks[-1] and "runs eagerly" in patcher.fallbacks[-1]


@torch.no_grad()
def test_capture_failure_through_patch_is_reported_and_unpatch_removes_the_runner():
    model = flux_model()
    inputs = zoo.transformer_inputs("flux", model, zoo.Shape(2, 3, 5, 7), torch.float32, seed=1)
    eager = forward(model, inputs)
    dit_kernels.patch(model, backend="torch", cuda_graphs=False)
    patched = forward(model, inputs)
    dit_kernels.unpatch(model)

    class Failing(EagerReplayBackend):
        def capture(self, fn, warmup):
            raise RuntimeError("no capture for this one")

    report = dit_kernels.patch(model, backend="torch", cuda_graphs=GraphConfig(backend=Failing()))
    runner = graph_runners(model)["forward"]
    assert isinstance(runner.backend, Failing) and any("GraphRunner (eager-replay)" in r for r in report.replaced)
    assert torch.equal(forward(model, inputs), patched) and runner.stats["failures"] == 1
    assert any("CUDA graphs: inputs ([2, 15, 16] float32" in f and "no capture for this one" in f
               for f in report.fallbacks), report.fallbacks  # fmt: skip
    dit_kernels.unpatch(model)
    assert "forward" not in model.__dict__ and torch.equal(forward(model, inputs), eager)


@torch.no_grad()
def test_torch_compile_traces_through_the_runner():
    model = flux_model()
    inputs = zoo.transformer_inputs("flux", model, zoo.Shape(2, 3, 5, 7), torch.float32, seed=1)
    dit_kernels.patch(model, backend="torch", cuda_graphs=GraphConfig(backend=EagerReplayBackend()))
    expected = forward(model, inputs)
    runner = graph_runners(model)["forward"]
    torch.testing.assert_close(forward(torch.compile(model, backend="eager"), inputs), expected, rtol=FP32_RTOL,
                               atol=FP32_ATOL)  # fmt: skip
    assert dict(runner.stats) == {"captures": 1, "replays": 1}, "the compiled call must not capture or replay"


@torch.no_grad()
def test_lora_injected_after_capture_makes_the_runner_capture_afresh():
    model = flux_model()
    inputs = zoo.transformer_inputs("flux", model, zoo.Shape(2, 3, 5, 7), torch.float32, seed=1)
    dit_kernels.patch(model, backend="torch", cuda_graphs=REPLAY)
    runner = graph_runners(model)["forward"]
    before = forward(model, inputs)
    inject_lora(model)
    ours = forward(model, inputs)
    assert runner.stats["invalidations"] == 1 and runner.stats["captures"] == 2 and not runner.failed
    assert not torch.allclose(ours, before) and torch.equal(ours, runner.forward(**inputs, return_dict=False)[0])


def _structure_hooks() -> list:
    """Our structure-watch hooks among torch's global registration hooks."""
    from torch.nn.modules import module as nn_module

    hooks = [*nn_module._global_module_registration_hooks.values(),
             *nn_module._global_parameter_registration_hooks.values()]  # fmt: skip
    return [hook for hook in hooks if getattr(hook, "__self__", None) is graph_runner_module._WATCH]


def test_structure_hooks_are_registered_only_while_a_runner_watches_a_module():
    """No import-time global hooks: torch's registration hooks are in place exactly while some runner that
    watches a module exists (other tests' live runners counted in ``before``)."""
    watch = graph_runner_module._WATCH
    gc.collect()
    before = watch._runners
    assert len(_structure_hooks()) == (2 if before else 0)
    model = flux_model()
    dit_kernels.patch(model, backend="torch", cuda_graphs=REPLAY)
    assert watch._runners == before + 1 and len(_structure_hooks()) == 2
    dit_kernels.unpatch(model)
    gc.collect()
    assert watch._runners == before and len(_structure_hooks()) == (2 if before else 0)


@torch.no_grad()
def test_weights_moved_to_other_memory_make_the_runner_capture_afresh():
    """``weight.data = ...`` (peft's merge) and ``.to()`` rebind parameters without registering anything: the
    runner notices by address and does not replay a recording of the old memory."""
    model = flux_model()
    inputs = zoo.transformer_inputs("flux", model, zoo.Shape(2, 3, 5, 7), torch.float32, seed=1)
    dit_kernels.patch(model, backend="torch", cuda_graphs=REPLAY)
    runner = graph_runners(model)["forward"]
    forward(model, inputs)
    forward(model, inputs)
    assert runner.stats["invalidations"] == 0 and runner.stats["captures"] == 1
    linear = model.transformer_blocks[0].ff.net[2]
    linear.weight.data = linear.weight.data * 2
    ours = forward(model, inputs)
    assert runner.stats["invalidations"] == 1 and runner.stats["captures"] == 2
    assert torch.equal(ours, runner.forward(**inputs, return_dict=False)[0])


@pytest.mark.parametrize("cfg", CFG_MODES)
@torch.no_grad()
def test_aliasing_with_the_cache_whole_forward_only(cfg):
    """cfg="joint": the runner around the whole forward may alias (every computed step returns its static
    output buffer): the cache keeps copies of the outputs it extrapolates from, so the skipped steps still
    predict from the real ones. cfg="per_half": each block's runner's outputs are read after later blocks
    replay, so ``alias_outputs`` is refused there (reported) and outputs are cloned. Either way every output
    is the cached eager one."""
    inputs = zoo.transformer_inputs("flux", flux_model(), zoo.Shape(2, 3, 5, 7), torch.float32, seed=1)
    config = dit_kernels.CacheConfig(threshold=1e9, cfg=cfg)  # bare transformer: 3 computed steps, then skips
    truth_model = flux_model()
    dit_kernels.patch(truth_model, backend="torch", cache=config, cuda_graphs=False)
    model = flux_model()
    aliasing = GraphConfig(backend=EagerReplayBackend(), alias_outputs=True)
    report = dit_kernels.patch(model, backend="torch", cache=config, cuda_graphs=aliasing)
    outputs = []  # kept alive: distinct tensors unless they alias one buffer
    for t in (999.0, 900.0, 800.0, 700.0, 600.0):
        inputs["timestep"] = torch.full((2,), t / 1000)
        outputs.append(forward(model, inputs))
        torch.testing.assert_close(outputs[-1], forward(truth_model, inputs), rtol=0, atol=0)
    trace = dit_kernels.cache_stats(model)["calls"][-1]["trace"]
    assert [e["decision"] for e in trace if e["group"] != "second half"] == ["compute"] * 3 + ["skip"] * 2
    computed = {out.data_ptr() for out in outputs[:3]}
    refused = [item for item in report.fallbacks if "alias_outputs is refused" in item]
    if cfg == "joint":
        assert len(computed) == 1 and not refused, (computed, report.fallbacks)
    else:
        assert len(computed) == 3 and refused, (computed, report.fallbacks)


def family_shape(family: str, model: nn.Module, height: int, width: int, batch: int = 2) -> zoo.Shape:
    text = {"dit": 0, "hunyuan": model.config.get("text_len")}.get(family, 8)
    return zoo.Shape(batch, height, width, text)


RESOLUTIONS = {"dit": ((8, 8), (12, 12)), "default": ((8, 8), (8, 12))}  # DiT takes square latents only


@pytest.mark.parametrize("family", zoo.FAMILIES)
@torch.no_grad()
def test_every_family_forward_has_no_host_sync_across_resolutions(family):
    """diffusers' eager forward and the patched forward of all five families under the strict audit
    (``HOST_SYNC_OPS``: .item(), bool(tensor), nonzero, torch.tensor...) at two resolutions: captured once
    each, replayed bit for bit (the CPU half of the no-sync proof)."""
    torch.manual_seed(0)
    model = zoo.build(family, "tiny")
    patched = copy.deepcopy(model)
    dit_kernels.patch(patched, backend="torch", cuda_graphs=False)
    for name, fn in (("eager", model.forward), ("patched", patched.forward)):
        runner = GraphRunner(fn, EagerReplayBackend(strict=True))
        for height, width in RESOLUTIONS.get(family, RESOLUTIONS["default"]):
            inputs = zoo.transformer_inputs(family, model, family_shape(family, model, height, width), torch.float32)
            assert torch.equal(runner(**inputs, return_dict=False)[0], fn(**inputs, return_dict=False)[0]), name
        assert not runner.failed, f"{family} {name}: {runner.failed}"
        assert runner.stats["captures"] == 2, f"{family} {name}: {dict(runner.stats)}"


# ----------------------------------------------------------------------------------------- whole pipelines


@contextlib.contextmanager
def graphed_pipeline(name: str, **config):
    """The cached tiny pipeline patched (torch ops) with its forward graphed on EagerReplayBackend (strict);
    always unpatched after."""
    with patched_pipeline(name, cuda_graphs=GraphConfig(backend=EagerReplayBackend(strict=True), **config)) as pipe:
        yield graph_runners(pipe)["forward"]


@contextlib.contextmanager
def patched_pipeline(name: str, **options):
    pipe = pipeline(name)
    dit_kernels.patch(pipe, backend="torch", **{"cuda_graphs": False, **options})
    try:
        yield pipe
    finally:
        dit_kernels.unpatch(pipe)


def pipeline(name: str):
    """The cached fp32 pipeline ``test_pipelines.run`` uses for the case."""
    return tiny_pipelines.build(CASES[name].pipeline, torch.float32)


def variant(name: str, latents: tuple, **call):
    case = CASES[name]
    return dataclasses.replace(case, call={**case.call, **call}, latents=latents)


PIPELINE_VARIANTS = {
    # the case itself, another resolution, another batch (one prompt / no CFG), the case again
    "flux": [CASES["flux"], variant("flux", (2, 16, 16), height=16, width=16),
             variant("flux", (1, 24, 16), prompt="a cat on the moon")],
    "sd3_cfg": [CASES["sd3_cfg"], variant("sd3_cfg", (1, 4, 12, 12), height=24, width=24),
                variant("sd3_cfg", (1, 4, 8, 12), guidance_scale=1.0)],
}  # fmt: skip


@pytest.mark.parametrize("name", PIPELINE_VARIANTS)
def test_whole_pipeline_recaptures_per_resolution_and_batch_and_evicts(name):
    cases = PIPELINE_VARIANTS[name] + PIPELINE_VARIANTS[name][:1]
    with patched_pipeline(name):
        expected = [run(case) for case in cases]  # patched, without graphs
    with graphed_pipeline(name, max_keys=2) as runner:
        for i, (case, want) in enumerate(zip(cases, expected)):
            assert torch.equal(run(case), want), f"{name} run {i}: graphed output differs"
            assert runner.stats["captures"] == i + 1, f"{name} run {i}: {dict(runner.stats)}"
        assert runner.stats["replays"] == 2 * len(cases) and not runner.failed  # 2 steps per run, all replayed
        assert runner.stats["evictions"] == 2 and len(runner.keys) == 2
    assert "forward" not in pipeline(name).transformer.__dict__


@pytest.mark.parametrize("name", CASES)
def test_every_pipeline_case_is_captured_once_and_replayed_every_step(name):
    """Each family's own pipeline passes the transformer inputs of one layout at every step (no key that
    changes per step, nothing the runner cannot key): one capture, every step replayed, same output."""
    with patched_pipeline(name):
        expected = run(CASES[name])
    with graphed_pipeline(name) as runner:
        got = run(CASES[name])
    assert torch.equal(got, expected), f"{name}: graphed output differs"
    assert dict(runner.stats) == {"captures": 1, "replays": 2}, dict(runner.stats)


# Step-cache settings whose decisions the rules force, whatever the model, on FORCED_STEPS steps: step 0 computed
# (warm-up), steps 1 and 2 too (no estimate: order 1 measures its first miss at the third computed step), which
# plans the longest run (3 skips: the miss is far below the threshold), step 6 computed (planned), step 7
# computed (final steps).
FORCED_SKIPS = dit_kernels.CacheConfig(threshold=1e9, warmup_steps=1, final_steps_computed=1,
                                       max_consecutive_skips=3)  # the trace below, whatever the default cap
FORCED_STEPS = 8
FORCED_TRACE = ["compute"] * 3 + ["skip"] * 3 + ["compute"] * 2
# Every family with cfg="joint", and with cfg="per_half" where its blocks allow half-batch runs.
FAMILY_CFGS = [(family, cfg) for family in zoo.FAMILIES for cfg in CFG_MODES
               if cfg == "joint" or not family_named(family).blocks.reshapes]  # fmt: skip


def decisions_by_group(trace: list[dict]) -> dict[str, list[str]]:
    """A call's decisions, per group ("batch", or "first half" / "second half")."""
    groups: dict[str, list[str]] = {}
    for entry in trace:
        groups.setdefault(entry["group"], []).append(entry["decision"])
    return groups


def assert_cache_runners(transformer: nn.Module, cfg: str, computed: int, captures: int = 1) -> None:
    """The runners where the cache's ``cfg`` puts them, none failed or run eagerly, each captured
    ``captures`` times and replayed on computed steps only (``computed`` times): "joint", one runner around
    the whole forward, which the cache's forward wraps (a skipped step replays nothing); "per_half", one per
    block, inside the cache's block wrappers (the embeddings and output layers run eagerly)."""
    runners = graph_runners(transformer)
    names = {id(module): name for name, module in transformer.named_modules()}
    blocks = [names[id(block)] for block in family_of(transformer).blocks.blocks(transformer)]
    assert list(runners) == (["forward"] if cfg == "joint" else blocks), list(runners)
    assert not any(r.failed for r in runners.values()), {name: r.failed for name, r in runners.items()}
    stats = {name: dict(r.stats) for name, r in runners.items()}
    assert all(s == {"captures": captures, "replays": computed} for s in stats.values()), stats


def cached_loop(model: nn.Module, family: str, inputs: dict, steps: int = FORCED_STEPS) -> tuple[torch.Tensor, list]:
    """A denoising loop as one step-cache call: the final latents and the cache's trace."""
    with dit_kernels.cache_session(model, num_steps=steps):
        latents = denoise(model, family, inputs, steps)
        return latents, dit_kernels.cache_stats(model)["calls"][-1]["trace"]


@pytest.mark.parametrize(("family", "cfg"), FAMILY_CFGS)
def test_every_family_with_step_cache_replays_computed_steps_only(family, cfg):
    """Every family's cached loop graphed (strict audit) where the cache's cfg puts the runners: joint, the
    whole forward; per_half, every block (SD3's last block without a text stream, HunyuanDiT's long skips,
    FLUX's two block kinds). The same latents and trace as without graphs, the forced decisions in every
    group, each runner replayed on the computed steps only."""
    torch.manual_seed(0)
    model = zoo.build(family, "tiny")
    inputs = zoo.transformer_inputs(family, model, family_shape(family, model, 8, 8), torch.float32)
    config = dataclasses.replace(FORCED_SKIPS, cfg=cfg)
    dit_kernels.patch(model, backend="torch", cache=config, cuda_graphs=False)
    expected = cached_loop(model, family, inputs)
    dit_kernels.unpatch(model)
    dit_kernels.patch(model, backend="torch", cache=config, cuda_graphs=REPLAY)
    latents, trace = cached_loop(model, family, inputs)
    assert torch.equal(latents, expected[0]) and trace == expected[1]
    groups = ["batch"] if cfg == "joint" else ["first half", "second half"]  # batch 2
    assert decisions_by_group(trace) == dict.fromkeys(groups, FORCED_TRACE), decisions_by_group(trace)
    assert_cache_runners(model, cfg, computed=FORCED_TRACE.count("compute"))


HALF_RULES = dit_kernels.CacheConfig(threshold=0.1, warmup_steps=1, final_steps_computed=0,
                                     max_consecutive_skips=100, cfg="per_half")  # fmt: skip


@pytest.mark.parametrize("family", [family for family, cfg in FAMILY_CFGS if cfg == "per_half"])
@torch.no_grad()
def test_per_half_block_runners_capture_the_half_batch_as_another_layout(family):
    """cfg="per_half" with halves that decide differently (``cfg_steps``: with HALF_RULES the first half
    skips once its first miss is measured, the second computes every step): on the steps where one half
    computes, every block runs on that half's rows, a second input layout each block runner captures once;
    the outputs and the trace are those of the cached model without graphs."""
    outputs, traces = {}, {}
    for graphed in (False, True):
        torch.manual_seed(0)
        model = zoo.build(family, "tiny")
        dit_kernels.patch(model, backend="torch", cache=HALF_RULES, cuda_graphs=REPLAY if graphed else False)
        with dit_kernels.cache_session(model):
            x = zoo.transformer_inputs(family, model, family_shape(family, model, 8, 8), torch.float32)
            outputs[graphed] = [model(**y, return_dict=False)[0] for y in cfg_steps(family, x)]
        traces[graphed] = dit_kernels.cache_stats(model)["calls"][-1]["trace"]
    assert traces[True] == traces[False]
    assert all(torch.equal(a, b) for a, b in zip(outputs[True], outputs[False], strict=True))
    groups = decisions_by_group(traces[True])
    steps = list(zip(groups["first half"], groups["second half"]))
    both, one = steps.count(("compute", "compute")), steps.count(("skip", "compute"))
    assert one > 0 and both + one == len(steps), groups  # the first half skips while the second computes
    assert_cache_runners(model, "per_half", computed=both + one, captures=2)


@pytest.mark.parametrize("cfg", CFG_MODES)
@pytest.mark.parametrize("name", ["flux", "sd3_cfg"])
def test_whole_pipeline_with_step_cache_replays_computed_steps_only(name, cfg):
    """A pipeline call with the step cache and graphs (the whole forward for joint, every block for
    per_half, whose halves are FLUX's two prompts and SD3's CFG halves): the same images and trace as the
    cached pipeline without graphs, the forced decisions in every group, runners replayed on the computed
    steps only."""
    case, config = CASES[name], dataclasses.replace(FORCED_SKIPS, cfg=cfg)
    with patched_pipeline(name, cache=config) as pipe:
        expected = run(case, steps=FORCED_STEPS)
        expected_trace = dit_kernels.cache_stats(pipe)["calls"][-1]["trace"]
    with patched_pipeline(name, cache=config, cuda_graphs=REPLAY) as pipe:
        got = run(case, steps=FORCED_STEPS)
        trace = dit_kernels.cache_stats(pipe)["calls"][-1]["trace"]
        assert_cache_runners(pipe.transformer, cfg, computed=FORCED_TRACE.count("compute"))
    assert torch.equal(got, expected) and trace == expected_trace
    groups = ["batch"] if cfg == "joint" else ["first half", "second half"]  # batch 2
    assert decisions_by_group(trace) == dict.fromkeys(groups, FORCED_TRACE), decisions_by_group(trace)


# ----------------------------------------------------------------------------------------- GPU


def cuda_models(family: str, dtype: torch.dtype, **patch_kwargs):
    """The fp32 eager truth, the eager model in ``dtype`` and a patched + graphed copy, on CUDA."""
    torch.manual_seed(0)
    truth = zoo.build(family, "tiny").cuda()
    eager = copy.deepcopy(truth).to(dtype)
    graphed = copy.deepcopy(eager)
    report = dit_kernels.patch(graphed, **patch_kwargs)
    return truth, eager, graphed, report


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", FAMILY_MODULES)
@torch.no_grad()
def test_gpu_graphed_forward_matches_eager_across_two_resolutions(family, dtype):
    truth_model, eager, graphed, report = cuda_models(family, dtype, cuda_graphs=True)
    runner = graph_runners(graphed)["forward"]
    assert isinstance(runner.backend, graphs.CudaGraphBackend), report
    patched = copy.deepcopy(eager)
    dit_kernels.patch(patched, cuda_graphs=False)
    resolutions = RESOLUTIONS.get(family, RESOLUTIONS["default"])
    for step, (height, width) in enumerate([*resolutions, *resolutions]):  # A, B, A, B: replays after capture
        shape = family_shape(family, truth_model, height, width)
        truth_inputs = zoo.transformer_inputs(family, truth_model, shape, torch.float32, "cuda", seed=step)
        truth = forward(truth_model, truth_inputs)
        inputs = zoo.transformer_inputs(family, truth_model, shape, dtype, "cuda", seed=step)
        ours, what = forward(graphed, inputs), f"{family} {dtype} {height}x{width}"
        if dtype == torch.float32:  # the same kernels as the patched model, replayed
            torch.testing.assert_close(ours, forward(patched, inputs), rtol=FP32_RTOL, atol=FP32_ATOL,
                                       msg=lambda m: f"{what}: {m}")  # fmt: skip
        else:  # the family tests' parity rule: within 2x eager bf16's error vs the fp32 truth
            assert_within_eager_bound(ours, forward(eager, inputs), truth, factor=2.0, what=what)
    assert not runner.failed, runner.failed
    assert runner.stats["captures"] == 2 and runner.stats["replays"] == 4 and runner.stats["eager"] == 0
    assert runner.nbytes > 0 and not any("CUDA graphs" in item for item in report.fallbacks), report


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILY_MODULES)
@torch.no_grad()
def test_gpu_strict_capture_proves_no_host_sync(family):
    """capture_error_mode="global": any CUDA call unsafe during capture (a sync, a pageable copy), in any
    thread, fails the capture. The patched forward captures; a forward with one ``.item()`` does not and
    runs eagerly with the reason."""
    torch.manual_seed(0)
    model = zoo.build(family, "tiny").cuda()
    dit_kernels.patch(model, cuda_graphs=False)
    inputs = zoo.transformer_inputs(family, model, family_shape(family, model, 8, 8), torch.float32, "cuda")
    runner = GraphRunner(model.forward, graphs.CudaGraphBackend(capture_error_mode="global"))
    want = forward(model, inputs)
    torch.testing.assert_close(runner(**inputs, return_dict=False)[0], want, rtol=FP32_RTOL, atol=FP32_ATOL)
    assert runner.stats["captures"] == 1 and not runner.failed

    def syncing(**kwargs):
        kwargs["hidden_states"].sum().item()
        return model.forward(**kwargs)

    reported = []
    bad = GraphRunner(syncing, graphs.CudaGraphBackend(capture_error_mode="global"), on_fallback=reported.append)
    torch.testing.assert_close(bad(**inputs, return_dict=False)[0], want, rtol=0, atol=0)
    assert bad.stats["failures"] == 1 and bad.stats["eager"] == 1 and "capture failed" in reported[0]
    assert torch.cuda.current_stream() == torch.cuda.default_stream(), "a failed capture left its stream current"
    size = RESOLUTIONS.get(family, RESOLUTIONS["default"])[1]
    other = zoo.transformer_inputs(family, model, family_shape(family, model, *size), torch.float32, "cuda")
    again = GraphRunner(model.forward, bad.backend)  # the failed capture's pool and capture stream
    torch.testing.assert_close(again(**other, return_dict=False)[0], forward(model, other), rtol=FP32_RTOL,
                               atol=FP32_ATOL)  # fmt: skip
    assert again.stats["captures"] == 1 and not again.failed, "capturing must work again after a failed capture"


def inject_lora(model: nn.Module) -> None:
    """A peft LoRA adapter with random nonzero weights on every attention projection (it changes the output)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(5)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    peft.inject_adapter_in_model(config, model)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_lora_injected_after_capture_is_replayed():
    """peft swaps modules in: the runner captures afresh, so the replay has the adapter (a stale graph would
    replay the model without it)."""
    _, _, graphed, _ = cuda_models("flux", torch.float32, cuda_graphs=True)
    inputs = zoo.transformer_inputs("flux", graphed, family_shape("flux", graphed, 8, 8), torch.float32, "cuda")
    before = forward(graphed, inputs)
    inject_lora(graphed)
    runner = graph_runners(graphed)["forward"]
    ours = forward(graphed, inputs)
    assert runner.stats["invalidations"] == 1 and runner.stats["captures"] == 2
    assert not torch.allclose(ours, before), "the adapter must change the output"
    eager = runner.forward(**inputs, return_dict=False)[0]  # the patched forward the runner wraps, with LoRA
    torch.testing.assert_close(ours, eager, rtol=FP32_RTOL, atol=FP32_ATOL)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_one_pool_lru_and_clone_vs_alias():
    family = FAMILY_MODULES[0]
    _, _, graphed, _ = cuda_models(family, torch.float32, cuda_graphs=True)
    runner = graph_runners(graphed)["forward"]
    runner.config.max_keys = 1
    shapes = [family_shape(family, graphed, *hw) for hw in RESOLUTIONS["default"]]
    inputs = [zoo.transformer_inputs(family, graphed, s, torch.float32, "cuda", seed=i) for i, s in enumerate(shapes)]
    first = forward(graphed, inputs[0])
    assert torch.equal(forward(graphed, inputs[0]), first), "a replay must reproduce the captured call"
    for _ in range(2):
        forward(graphed, inputs[1])  # the first call evicts the first key; its graph is released
    assert runner.stats["evictions"] == 1 and len(runner.keys) == 1
    torch.testing.assert_close(forward(graphed, inputs[0]), first, rtol=0, atol=0)  # recaptured in the same pool
    assert runner.stats["captures"] == 3 and not runner.disabled
    runner.config.alias_outputs = True
    a = graphed(**inputs[0], return_dict=False)[0]
    b = graphed(**inputs[0], return_dict=False)[0]
    assert a.data_ptr() == b.data_ptr(), "aliasing returns the static output buffer"


@pytest.mark.gpu
@pytest.mark.parametrize(("family", "cfg"), FAMILY_CFGS)
@torch.no_grad()
def test_gpu_graphs_with_step_caching_match_the_cached_eager_loop(family, cfg):
    """A denoising loop with the step cache, with and without cuda_graphs=True, gives the same latents and
    the same decisions; graphed, each runner (joint: the whole forward; per_half: every block) is captured
    once and replayed on the computed steps only (no recording spans the decision)."""
    runs, config = {}, dataclasses.replace(FORCED_SKIPS, cfg=cfg)
    for graphs_on in (False, True):
        truth_model, _, model, _ = cuda_models(family, torch.float32, cache=config, cuda_graphs=graphs_on)
        shape = family_shape(family, truth_model, 8, 8)
        latents, trace = cached_loop(model, family, zoo.transformer_inputs(family, truth_model, shape, torch.float32,
                                                                           "cuda"))  # fmt: skip
        runs[graphs_on] = latents, decisions_by_group(trace)
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=FP32_RTOL, atol=FP32_ATOL)
    groups = ["batch"] if cfg == "joint" else ["first half", "second half"]
    assert runs[True][1] == runs[False][1] == dict.fromkeys(groups, FORCED_TRACE), (runs[True][1], runs[False][1])
    assert_cache_runners(model, cfg, computed=FORCED_TRACE.count("compute"))


# ----------------------------------------------------------------------------------------- bench CLI


def test_bench_cli_says_graphs_are_unavailable_on_cpu(capsys):
    bench_main(["--model", "flux", "--config", "tiny", "--size", "32", "--steps", "1", "--repeats", "1",
                "--cuda-graphs"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "--cuda-graphs row skipped: CUDA graphs are unavailable on cpu" in printed, printed
    assert "| patched |" in printed and "CUDA graphs |" not in printed


@pytest.mark.gpu
def test_gpu_bench_cli_adds_graphed_rows(tmp_path, capsys):
    """--cuda-graphs: a graphed twin of the patched row and of each cache row, as accurate as its twin; the
    cached one evaluates the same blocks (the cache decides the same around the whole-forward graph, which
    it replays on computed steps only: one capture, as the patched row)."""
    bench_main(["--model", "flux", "--config", "tiny", "--size", "64", "--steps", "10", "--repeats", "1",
                "--cache", "1e9", "--cuda-graphs", "--out", str(tmp_path)])  # fmt: skip
    printed = capsys.readouterr().out
    rows = {row["path"]: row for row in json.loads((tmp_path / "results.json").read_text())["rows"]}
    cached = f"patched + cache {1e9:g}"  # the label prints the threshold with :g
    for twin in ("patched", cached):
        graphed = rows[f"{twin} + CUDA graphs"]
        assert graphed["ms/step"] > 0 and graphed["blocks evaluated"] == rows[twin]["blocks evaluated"], rows
        assert graphed["max-abs vs fp32"] <= 2 * rows[twin]["max-abs vs fp32"] + 1e-3, rows
    assert "patched + CUDA graphs: 1 captures" in printed, printed
    assert f"{cached} + CUDA graphs: 1 captures" in printed and printed.count(" 0 eager calls") == 2
