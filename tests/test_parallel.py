"""Context parallelism (``dit_kernels.enable_parallelism``) on CPU: two ranks over gloo, every family.

The ranks are a pool of two worker processes started once for this module (``parallel_harness``); each
task below runs on both ranks, every rank building the same seeded tiny model and inputs, computing the
single-process result itself (the truth) and then the parallel one. Outputs come back as numpy arrays.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
from parallel_harness import Pool
from patch_parity import FP32_ATOL, FP32_RTOL
from tolerances import assert_within_eager_bound

import dit_kernels
from dit_kernels.bench import e2e, zoo
from dit_kernels.graphs import EagerReplayBackend, GraphConfig, graph_runners
from dit_kernels.models import FAMILY_MODULES, family_named
from dit_kernels.parallel import enable
from dit_kernels.parallel.enable import parallel_config

# Every family's tiny config, and SD3.5's blocks (per-head RMSNorm of q/k, the dual attention's attn2)
CASES = {name: (name, {}) for name in FAMILY_MODULES} | {
    "sd3.5": ("sd3", {"num_layers": 3, "qk_norm": "rms_norm", "dual_attention_layers": (0, 1)})}
# (ulysses_degree, ring_degree) over the two ranks
MODES = {"ulysses": (2, 1), "ring": (1, 2)}
# Batch 2 (the sequence chunks are strided views); 8 x 8 latents (FLUX: tokens) and 6 text tokens: both even.
SHAPE = zoo.Shape(2, 8, 8, 6)
VIDEO = ("wan", "latte")  # their shapes get 3 frames: attention across frames, Latte's temporal blocks


def shape_of(name: str, shape: zoo.Shape = SHAPE) -> zoo.Shape:
    return dataclasses.replace(shape, frames=3) if name in VIDEO else shape
STEPS = 8
# Random weights (tiny configs): the output extrapolated from the last two computed steps misses the real one
# by 5-55 %, so 0.5 skips some steps of every family, with misses measured before and after a skip run.
CACHE = dit_kernels.CacheConfig(threshold=0.5, warmup_steps=1, final_steps_computed=1)


@pytest.fixture(scope="module")
def pool():
    workers = Pool(2)
    yield workers
    workers.close()


@pytest.fixture(scope="module")
def gpu_pool():
    """Two ranks over NCCL, one GPU each."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices, found {torch.cuda.device_count()}")
    workers = Pool(2, backend="nccl")
    yield workers
    workers.close()


def _model_and_inputs(name: str, **overrides):
    torch.manual_seed(0)
    model = family_named(name).build("tiny", **overrides)
    return model, zoo.transformer_inputs(name, model, shape_of(name), torch.float32)


def _forward(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0].numpy()


def _assert_fp32_close(got, want, what: str) -> None:
    """Equal within fp32 reduction noise (the shards change the order of the attention's sums)."""
    got, want = (torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in (got, want))
    torch.testing.assert_close(got, want, rtol=FP32_RTOL, atol=FP32_ATOL, msg=lambda m: f"{what}: {m}")


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _outcome(fn):
    """``fn()``'s output, or the ValueError it raised (as its message)."""
    try:
        return fn()
    except ValueError as err:
        return str(err)


# ----------------------------------------------------------------------------------------- rank tasks


def parity_task(name: str, overrides: dict, ulysses: int, ring: int) -> dict:
    """The single-process eager output, and the parallel one patched after / before enable_parallelism
    and unpatched."""
    model, inputs = _model_and_inputs(name, **overrides)
    degrees = {"ulysses_degree": ulysses, "ring_degree": ring}
    patched_first = copy.deepcopy(model)
    dit_kernels.patch(patched_first)
    dit_kernels.enable_parallelism(patched_first, **degrees)
    parallel_first = copy.deepcopy(model)
    dit_kernels.enable_parallelism(parallel_first, **degrees)
    unpatched = copy.deepcopy(parallel_first)
    dit_kernels.patch(parallel_first)
    seen = {}  # the tokens the first block gets, in one process and on this rank
    for label, whole in (("whole", model), ("shard", parallel_first)):
        family_named(name).blocks.blocks(whole)[0].register_forward_pre_hook(_record_tokens(seen, label),
                                                                             with_kwargs=True)  # fmt: skip
    outputs = {"patch, then enable_parallelism": _forward(patched_first, inputs),
               "enable_parallelism, then patch": _forward(parallel_first, inputs)}  # fmt: skip
    dit_kernels.unpatch(parallel_first)
    return {"truth": _forward(model, inputs), "outputs": outputs, "block tokens": seen,
            "unpatched": _outcome(lambda: _forward(unpatched, inputs)),
            "unpatch keeps the shards": _outcome(lambda: _forward(parallel_first, inputs))}  # fmt: skip


def _record_tokens(seen: dict, label: str):
    """A block pre-hook that keeps the length of the first ``hidden_states`` it gets as ``seen[label]``."""

    def hook(block, args, kwargs) -> None:
        seen.setdefault(label, kwargs.get("hidden_states", args[0] if args else None).shape[1])

    return hook


def cache_task(name: str, ulysses: int, ring: int) -> dict:
    """A step-cached denoising loop in one process and in parallel: final latents and decision traces."""
    model, inputs = _model_and_inputs(name)
    runs = {}
    for label in ("one process", "parallel"):
        cached = copy.deepcopy(model)
        if label == "parallel":
            dit_kernels.enable_parallelism(cached, ulysses_degree=ulysses, ring_degree=ring)
        dit_kernels.patch(cached, cache=CACHE)
        with dit_kernels.cache_session(cached, num_steps=STEPS):
            latents = e2e.denoise(cached, name, inputs, STEPS)
        runs[label] = (latents.numpy(), dit_kernels.cache_stats(cached)["calls"][-1]["trace"])
    return runs


def graphs_task(name: str, dtype_name: str) -> dict:
    """Patched with graphs (CUDA graphs over NCCL on GPU ranks; the eager-replay backend with its host-sync
    audit on CPU) after enable_parallelism: outputs over two layouts, twice (captures, then replays), the
    runner's stats; a step-cached graphed loop's latents, decisions and runners (the cache's forward wraps
    the whole-forward runner, collectives included); the one-process results."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    graphs = True if device.type == "cuda" else GraphConfig(backend=EagerReplayBackend(strict=True))
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    truth_model = family_named(name).build("tiny").to(device)
    eager = copy.deepcopy(truth_model).to(dtype)
    patched = copy.deepcopy(eager)
    dit_kernels.patch(patched, cuda_graphs=False)
    graphed = copy.deepcopy(eager)
    dit_kernels.enable_parallelism(graphed, ulysses_degree=dist.get_world_size())
    dit_kernels.patch(graphed, cuda_graphs=graphs)
    shapes = [shape_of(name), shape_of(name, zoo.Shape(2, 8, 12, 4))] * 2
    forwards = []
    for step, shape in enumerate(shapes):
        inputs = zoo.transformer_inputs(name, eager, shape, dtype, device, seed=step)
        truth_inputs = zoo.transformer_inputs(name, eager, shape, torch.float32, device, seed=step)
        forwards.append({label: _forward_on(model, inputs if model is not truth_model else truth_inputs)
                         for label, model in (("graphed", graphed), ("patched", patched), ("eager", eager),
                                              ("truth", truth_model))})  # fmt: skip
    runner = graph_runners(graphed)["forward"]
    cached = {}
    for label, options in (("one process", {"cuda_graphs": False}), ("parallel", {"cuda_graphs": graphs})):
        model = copy.deepcopy(truth_model)
        if label == "parallel":
            dit_kernels.enable_parallelism(model, ulysses_degree=dist.get_world_size())
        dit_kernels.patch(model, cache=CACHE, **options)
        with dit_kernels.cache_session(model, num_steps=STEPS):
            inputs = zoo.transformer_inputs(name, model, shape_of(name), torch.float32, device)
            latents = e2e.denoise(model, name, inputs, STEPS)
        trace = [entry["decision"] for entry in dit_kernels.cache_stats(model)["calls"][-1]["trace"]]
        cached[label] = (latents.cpu().numpy(), trace)
    return {"forwards": forwards, "stats": dict(runner.stats), "failed": list(runner.failed),
            "cache runners": {k: (dict(r.stats), list(r.failed)) for k, r in graph_runners(model).items()},
            "cached": cached}  # fmt: skip


def _forward_on(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0].float().cpu().numpy()


def pipeline_pair_task() -> dict:
    """A pipeline holding two transformers (Wan 2.2 A14B's ``transformer`` and ``transformer_2``): both
    sharded on one mesh by one call; each one's output and its single-process one."""
    first, inputs = _model_and_inputs("wan")
    torch.manual_seed(1)
    second = family_named("wan").build("tiny")
    pipe = types.SimpleNamespace(transformer=copy.deepcopy(first), transformer_2=copy.deepcopy(second),
                                 components={"transformer": None, "transformer_2": None})  # fmt: skip
    config = dit_kernels.enable_parallelism(pipe, ulysses_degree=2)
    dit_kernels.patch(pipe)
    return {"one config": pipe.transformer._parallel_config is pipe.transformer_2._parallel_config is config,
            "outputs": [(_forward(model, inputs), _forward(parallel, inputs))
                        for model, parallel in ((first, pipe.transformer), (second, pipe.transformer_2))]}  # fmt: skip


def refusal_task() -> dict:
    """Each refusal's message, and whether the model stayed as it was."""
    model, inputs = _model_and_inputs("flux")
    before = copy.deepcopy(model)
    served = enable.PROCESS_GROUP_BACKENDS.pop("cpu")  # as if CPU tensors needed another backend than gloo
    try:
        backend = _outcome(lambda: dit_kernels.enable_parallelism(model, ulysses_degree=2))
    finally:
        enable.PROCESS_GROUP_BACKENDS["cpu"] = served
    messages = {
        "backend": backend,
        "world size": _outcome(lambda: dit_kernels.enable_parallelism(model, ulysses_degree=2, ring_degree=2)),
        "heads": _outcome(lambda: dit_kernels.enable_parallelism(_model_and_inputs("flux", num_attention_heads=3)[0],
                                                                 ulysses_degree=2)),  # fmt: skip
    }
    unchanged = _hooks(model) == 0 and parallel_config(model) is None and np.array_equal(_forward(model, inputs),
                                                                                        _forward(before, inputs))
    dit_kernels.enable_parallelism(model, ulysses_degree=2)
    messages["twice"] = _outcome(lambda: dit_kernels.enable_parallelism(model, ring_degree=2))
    odd = zoo.transformer_inputs("flux", model, zoo.Shape(1, 7, 7, 6), torch.float32)
    messages["sequence"] = _outcome(lambda: _forward(model, odd))
    works_after = np.abs(_forward(model, inputs) - _forward(before, inputs)).max()
    dit_kernels.disable_parallelism(model)
    restored = _hooks(model) == 0 and np.array_equal(_forward(model, inputs), _forward(before, inputs))
    return {"messages": messages, "unchanged": unchanged, "works after": works_after, "restored": restored}


# ----------------------------------------------------------------------------------------- tests


def test_every_family_has_a_plan():
    assert [name for name in FAMILY_MODULES if family_named(name).parallel_plan is None] == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_parallel_matches_one_process(pool, name, mode):
    """Patched + parallel, in either order, equals single-process eager within fp32 reduction noise on
    every rank, whose blocks see half the tokens; unpatch leaves the parallel model running (diffusers'
    processors where they reach the parallel attention, else a ValueError asking for patch)."""
    for rank, result in enumerate(pool.run(parity_task, *CASES[name], *MODES[mode])):
        tokens = result["block tokens"]
        assert tokens["shard"] * 2 == tokens["whole"], f"{name} {mode} rank {rank}: blocks see no shard: {tokens}"
        for label, out in result["outputs"].items():
            _assert_fp32_close(out, result["truth"], f"{name} {mode} rank {rank} {label}")
        for label in ("unpatched", "unpatch keeps the shards"):
            out = result[label]
            if isinstance(out, str):
                assert "dit_kernels.patch(...)" in out, f"{name} {mode} rank {rank} {label}: {out}"
            else:
                _assert_fp32_close(out, result["truth"], f"{name} {mode} rank {rank} {label}")


@pytest.mark.parametrize("name", FAMILY_MODULES)
def test_cache_decides_the_same_on_every_rank(pool, name):
    """With a threshold that skips, every rank takes the single-process decisions: they come from the
    transformer's output, which every rank gathers whole, so the misses are the same on every rank (bit for
    bit) and as one process's within fp32 reduction noise; the latents match the single-process loop."""
    results = pool.run(cache_task, name, *MODES["ulysses"])
    single_latents, single_trace = results[0]["one process"]
    assert any(entry["decision"] == "skip" for entry in single_trace), f"{name}: threshold skipped nothing"
    assert sum(entry["miss"] is not None for entry in single_trace) >= 2, f"{name}: {single_trace}"
    assert all(result["parallel"][1] == results[0]["parallel"][1] for result in results), f"{name}: ranks differ"
    for rank, result in enumerate(results):
        latents, trace = result["parallel"]
        assert [e["decision"] for e in trace] == [e["decision"] for e in single_trace], f"{name} rank {rank}"
        misses = [(e["miss"], s["miss"]) for e, s in zip(trace, single_trace, strict=True)]
        assert all((got is None) == (want is None) for got, want in misses), f"{name} rank {rank}: {misses}"
        assert all(abs(got - want) <= 1e-5 * want for got, want in misses if want is not None), (
            f"{name} rank {rank}: {misses}")  # fmt: skip
        _assert_fp32_close(latents, single_latents, f"{name} rank {rank}")


def test_a_pipelines_transformers_share_one_mesh(pool):
    for rank, result in enumerate(pool.run(pipeline_pair_task)):
        assert result["one config"]
        for index, (truth, out) in enumerate(result["outputs"]):
            _assert_fp32_close(out, truth, f"rank {rank} transformer {index + 1}")


def test_refusals_leave_the_model_unchanged(pool):
    for result in pool.run(refusal_task):
        messages = result["messages"]
        assert "is on cpu, which the process group backend 'gloo' cannot serve" in messages["backend"]
        assert "does not match the world size 2" in messages["world size"]
        assert "does not divide the 3 attention heads" in messages["heads"]
        assert "already parallel" in messages["twice"]
        assert "49 positions along dim 1, which 2 does not divide" in messages["sequence"], messages["sequence"]
        assert result["unchanged"], "a refused enable_parallelism changed the model"
        assert result["works after"] <= 1e-5, "a forward after the refused sequence does not match"
        assert result["restored"], "disable_parallelism did not restore the model"


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_plan_is_diffusers_own(name):
    family = family_named(name)
    assert family.parallel_plan == family.classes[0]._cp_plan


def test_refusals_without_a_process_group(monkeypatch):
    model, _ = _model_and_inputs("flux")
    flux = family_named("flux")
    monkeypatch.setattr(sys.modules[flux.apply.__module__], "FAMILY", dataclasses.replace(flux, parallel_plan=None))
    with pytest.raises(ValueError, match="family flux has no context-parallel plan; families with one: "):
        dit_kernels.enable_parallelism(model, ulysses_degree=2)
    monkeypatch.undo()
    with pytest.raises(TypeError, match="Linear is not a supported transformer"):
        dit_kernels.enable_parallelism(torch.nn.Linear(2, 2), ulysses_degree=2)
    for degrees, message in (({"ulysses_degree": 0}, "ulysses_degree must be an int >= 1, got 0"),
                             ({"ring_degree": 2.0}, "ring_degree must be an int >= 1, got 2.0"),
                             ({}, "is 1: nothing to run in parallel")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            dit_kernels.enable_parallelism(model, **degrees)
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        dit_kernels.enable_parallelism(model, ulysses_degree=2)
    assert parallel_config(model) is None and not model._forward_pre_hooks


def test_bench_command_runs():
    """``torchrun -m dit_kernels.bench --parallel ulysses=2``: a table row per path, the sharded output equal
    to the one-process output within fp32 noise."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "dit_kernels.bench", "--parallel", "ulysses=2", "--steps", "2", "--repeats", "1", "--cache", "0.08"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 ranks (gloo) | ulysses 2 x ring 1" in done.stdout, done.stdout
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| patched")]
    assert [row[0].strip() for row in rows] == ["patched", "patched + cache 0.08"], done.stdout
    assert all(float(row[4]) <= 1e-5 for row in rows), done.stdout


def _assert_graphs(results: list, name: str, dtype: torch.dtype) -> None:
    """graphs_task's results: each of the two layouts captured once, every call replayed, no failure; every graphed
    output as the one-process patched one (fp32: reduction noise; bf16: within 2x eager bf16's error vs the
    fp32 truth); the cached graphed loop decides as one process, its whole-forward runner captured once and
    replayed on the computed steps only."""
    for rank, result in enumerate(results):
        what = f"{name} {dtype} rank {rank}"
        calls = len(result["forwards"])
        assert result["failed"] == [] and result["stats"]["captures"] == 2 and result["stats"]["replays"] == calls, (
            f"{what}: {result['stats']} {result['failed']}")  # fmt: skip
        for step, out in enumerate(result["forwards"]):
            graphed, patched, eager, truth = (torch.from_numpy(out[k])
                                              for k in ("graphed", "patched", "eager", "truth"))  # fmt: skip
            if dtype == torch.float32:
                _assert_fp32_close(graphed, patched, f"{what} forward {step}")
            else:
                assert_within_eager_bound(graphed, eager, truth, factor=2.0, what=f"{what} forward {step}")
        (single, single_trace), (latents, trace) = result["cached"]["one process"], result["cached"]["parallel"]
        assert trace == single_trace and "skip" in trace, f"{what}: {trace} vs {single_trace}"
        _assert_fp32_close(latents, single, f"{what}: cached latents")
        computed = {"captures": 1, "replays": trace.count("compute")}
        assert result["cache runners"] == {"forward": (computed, [])}, f"{what}: {result['cache runners']}"


@pytest.mark.parametrize("name", ["flux", "dit", "wan"])  # diffusers' plan, a legacy family, a split at a block
def test_graph_runner_with_parallel_on_cpu(pool, name):
    """The CUDA-graph runner's logic (eager-replay backend, host-sync audit) around a sharded forward:
    the collectives sit inside the recording, the split before it, nothing syncs the host."""
    _assert_graphs(pool.run(graphs_task, name, "float32"), name, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", FAMILY_MODULES)
def test_gpu_cuda_graphs_capture_nccl_collectives(gpu_pool, name, dtype):
    """Two GPUs over NCCL: the patched, sharded forward captured in CUDA graphs (the Ulysses all-to-alls and
    the output all-gather recorded), replayed, as one GPU computes it; with the step cache, the whole
    forward replayed on computed steps only and the same decisions as one process."""
    _assert_graphs(gpu_pool.run(graphs_task, name, dtype), name, getattr(torch, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_attention_with_lse_flash_matches_reference(dtype):
    """Ring's local op on CUDA in half precision (PyTorch's flash kernel) against the fp32 reference math
    (the CPU path): output within half-precision rounding, log-sum-exp to fp32 accumulation noise."""
    from dit_kernels.parallel.attention import attention_with_lse

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, s, 4, 64, device="cuda") for s in (96, 80, 80))
    out, lse = attention_with_lse(*(t.to(dtype) for t in (q, k, v)))
    ref_out, ref_lse = attention_with_lse(*(t.to(dtype).float().cpu() for t in (q, k, v)))
    assert out.dtype == lse.dtype == torch.float32 and out.shape == ref_out.shape and lse.shape == ref_lse.shape
    torch.testing.assert_close(out.cpu(), ref_out, rtol=0, atol=4 * torch.finfo(dtype).eps)
    torch.testing.assert_close(lse.cpu(), ref_lse, rtol=1e-5, atol=1e-5)
