"""End-to-end benchmark: a denoising loop of one family's transformer, eager diffusers vs patched (and
torch.compile when asked), same process, same inputs, warm-up excluded, timed in interleaved rounds by
``bench.timing`` (median and IQR per row, the ratio vs eager with an interval, warnings where noise makes a
figure meaningless).

The loop is a plain Euler flow-matching sampler (``x += (t_next - t) * prediction``, t from 1000 to 0)
around the transformer alone: the text encoders and the VAE are not part of what ``patch`` changes, so
they are left out, and the loop is the same for every family. Weights are random (no download), so the
latents are not images; fidelity is the max-abs error and PSNR of the final latents against the eager
model run in fp32 on the same inputs. A step-cache row (``--cache T``) runs each loop as one cache call
(``cache_session`` with the step count); its "blocks evaluated" is what the cache computed, and its note
gives the hit rate and the per-step decisions (c = computed, s = skipped). With ``--cuda-graphs`` (CUDA
only) the patched row and each cache row get a graphed twin, captured in the warm-up; their note counts
captures, replays and eager calls.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

import dit_kernels
from dit_kernels.bench import timing, zoo
from dit_kernels.graphs import graph_runners
from dit_kernels.models import family_named


@dataclass(frozen=True)
class Setting:
    """What to run: ``family`` at ``config`` width, a ``size`` px image (latent = size / 8), ``steps``."""

    family: str
    config: str = "small"
    size: int = 256
    batch: int = 1
    steps: int = 20
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def shape(self, model) -> zoo.Shape:
        side = self.size // 8 // family_named(self.family).latent_packing  # packed: the token grid
        text = zoo.default_text_len(self.family, model.config)
        return zoo.Shape(self.batch, side, side, text if self.config == "real" else min(text, 77))


@dataclass
class Path:
    """One row: a label and a transformer (eager, compiled or patched) with what it needs to report."""

    label: str
    model: Callable
    note: str = ""
    cache: Optional[float] = None  # step-cache threshold of a cached row

    def denoise(self, setting: Setting, inputs: dict) -> torch.Tensor:
        """The path's loop; a cached row's is one cache call of ``setting.steps`` steps."""
        session = dit_kernels.cache_session(self.model, num_steps=setting.steps) if self.cache is not None else (
            contextlib.nullcontext())  # fmt: skip
        with session:
            return denoise(self.model, setting.family, inputs, setting.steps)


def denoise(model: Callable, family: str, inputs: dict, steps: int) -> torch.Tensor:
    """Euler flow steps from t = 1000 to 0; returns the final latents (fp32)."""
    inputs = dict(inputs)
    latents = inputs["hidden_states"]
    dim = zoo.prediction_channels(family)
    channels = latents.shape[dim]
    times = torch.linspace(1000, 0, steps + 1).tolist()
    with torch.no_grad():
        for t, t_next in zip(times[:-1], times[1:]):
            inputs["hidden_states"] = latents
            zoo.set_timestep(family, inputs, t)
            prediction = model(**inputs, return_dict=False)[0]
            prediction = prediction.narrow(dim, 0, channels)  # learned sigma: the first half
            latents = latents + (t_next - t) / 1000 * prediction
    return latents.float()


def psnr(got: torch.Tensor, truth: torch.Tensor) -> float:
    """20 log10(range(truth) / rmse): inf when equal."""
    mse = (got.double() - truth.double()).pow(2).mean().item()
    peak = (truth.max() - truth.min()).item()
    return math.inf if mse == 0 else 20 * math.log10(peak / math.sqrt(mse))


def build_paths(setting: Setting, compile_: bool, backend: str, cuda_graphs: bool = False,
                caches: Sequence[float] = ()) -> tuple[torch.nn.Module, list[Path]]:  # fmt: skip
    """The fp32 eager model (the truth) and the paths to time, all with the same weights (the patched and
    cached rows share the eager model's weight tensors: no copy)."""
    torch.manual_seed(0)
    truth_model = zoo.build(setting.family, setting.config).to(setting.device)
    eager = zoo.to_dtype(copy.deepcopy(truth_model), setting.dtype)
    paths = [Path("eager diffusers", eager)]
    if compile_:
        paths.append(Path("torch.compile", torch.compile(eager)))
    patched = _sharing_weights(eager)
    report = dit_kernels.patch(patched, backend=backend, cuda_graphs=False)
    paths.append(Path("patched", patched, note=ops_line(report.backends)))
    if cuda_graphs:
        graphed = copy.deepcopy(eager)
        dit_kernels.patch(graphed, backend=backend, cuda_graphs=True)
        paths.append(Path("patched + CUDA graphs", graphed))
    for threshold, graphed in itertools.product(caches, (False, True)[: 1 + cuda_graphs]):
        model = _sharing_weights(eager)
        dit_kernels.patch(model, backend=backend, cuda_graphs=graphed, cache=threshold)
        paths.append(Path(f"patched + cache {threshold:g}" + " + CUDA graphs" * graphed, model, cache=threshold))
    return truth_model, paths


def _sharing_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model``'s modules sharing its parameter and buffer tensors (no copy of the weights)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def ops_line(backends: dict[str, str]) -> str:
    """The patch report's op backends as one line: ``patched ops: norm = torch: ...; rope = ...``."""
    return "patched ops: " + "; ".join(f"{op} = {why}" for op, why in backends.items())


def run(setting: Setting, *, repeats: Optional[int] = None, budget_s: float = timing.BUDGET_S,
        compile_: bool = False, backend: str = "auto", cuda_graphs: bool = False, caches: Sequence[float] = (),
        progress=None) -> dict:  # fmt: skip
    """Time every path after one warm-up each (which captures the CUDA graphs of the graphed path) with
    ``timing.measure`` (``repeats`` rounds, or its default: at least 5 and until ``budget_s``); errors vs
    fp32 eager. Returns the table's rows, the token count, notes, warnings, the ``timing.Timing`` and the
    patched row's op backends."""
    truth_model, paths = build_paths(setting, compile_, backend, cuda_graphs, caches)
    shape = setting.shape(truth_model)
    inputs = zoo.transformer_inputs(setting.family, truth_model, shape, setting.dtype, setting.device)
    outputs = {p.label: p.denoise(setting, inputs) for p in paths}  # warm-up
    truth = outputs[paths[0].label]  # in fp32 the eager row computes the truth: same weights, same inputs
    if setting.dtype != torch.float32:
        truth_inputs = zoo.transformer_inputs(setting.family, truth_model, shape, torch.float32, setting.device)
        truth = denoise(truth_model, setting.family, truth_inputs, setting.steps)
    runs = {p.label: functools.partial(p.denoise, setting, inputs) for p in paths}
    measured = timing.measure(runs, repeats=repeats, budget_s=budget_s, device=setting.device, progress=progress)
    eager = paths[0].label
    blocks = sum(len(m) for m in truth_model.children() if isinstance(m, torch.nn.ModuleList))
    rows = []
    for p in paths:
        spread, ratio = measured.spread(p.label), measured.ratio(eager, p.label)
        rows.append({
            "path": p.label, "ms/step": spread.median / setting.steps, "IQR %": round(100 * spread.iqr_fraction, 1),
            "vs eager": ratio.median, "vs eager interval": f"{ratio.low:.3g}..{ratio.high:.3g}",
            "blocks evaluated": blocks * setting.steps if p.cache is None else _last_call(p)["blocks_computed"],
            "max-abs vs fp32": (outputs[p.label] - truth).abs().max().item(),
            "PSNR vs fp32 (dB)": psnr(outputs[p.label], truth),
        })  # fmt: skip
    tokens = zoo.tokens(setting.family, truth_model.config, shape)
    notes = [p.note for p in paths if p.note] + [_graphs_note(p) for p in paths if graph_runners(p.model)]
    notes += [_cache_note(p) for p in paths if p.cache is not None]
    coverage = measured.ratio(eager, eager).coverage  # the same for every row: same rounds
    notes.append(f"vs eager: median of the per-round ratios; vs eager interval: distribution-free, holds the true "
                 f"median with probability {coverage:.0%}")  # fmt: skip
    patched = next(p for p in paths if p.label == "patched")
    return {"rows": rows, "tokens": f"{tokens}+{shape.text_len}" if shape.text_len else str(tokens), "notes": notes,
            "warnings": measured.warnings(eager), "timing": measured,
            "ops": dit_kernels.patch_report(patched.model).backends}  # fmt: skip


def _graphs_note(path: Path) -> str:
    """What the graphed path's runners did: captures, replays, eager calls and why (the PatchReport's
    fallbacks, which include captures that failed)."""
    stats = sum((runner.stats for runner in graph_runners(path.model).values()), collections.Counter())
    fallbacks = [item for item in dit_kernels.patch_report(path.model).fallbacks if item.startswith("CUDA graphs")]
    return (f"{path.label}: {stats['captures']} captures, {stats['replays']} replays, {stats['eager']} eager calls"
            + "".join(f"; {item}" for item in fallbacks))


def _last_call(path: Path) -> dict:
    return dit_kernels.cache_stats(path.model)["calls"][-1]


def _cache_note(path: Path) -> str:
    call = _last_call(path)
    steps = "".join(entry["decision"][0] for entry in call["trace"])
    return f"{path.label}: hit rate {call['hit_rate']:.0%}, steps {steps} (c computed, s skipped)"
