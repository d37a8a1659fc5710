"""``patch`` / ``unpatch``: find the transformer, look up its ``Family``, check everything, apply, report.

Nothing changes until every check has passed (the object, its family, its parameters, the family's
config checks, the backends); if applying fails half-way the swaps made so far are undone before the
error propagates, so a refused or failed ``patch`` leaves the model exactly as it was.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, fields
from typing import Mapping, Optional, Union

import torch
from torch import nn

from dit_kernels import backends, graphs
from dit_kernels.cache import CacheConfig, StepCache, as_config
from dit_kernels.cache import validate as validate_cache
from dit_kernels.models import family_of, supported_classes
from dit_kernels.patching import EAGER, OPS, OpBackends, Patcher, find_transformers

log = logging.getLogger("dit_kernels")

_STATE = "_dit_kernels_patch"
BACKEND_CHOICES = ("auto", "triton", "cuda", "torch", "cuda_emu")


@dataclass
class PatchReport:
    """What ``patch`` did: the family, each op's switch and backend and why (``backends``, keyed by
    "norm", "rope", "attention"), every module attribute it replaced, and everything left on diffusers'
    eager path with the reason."""

    family: str
    transformer_class: str
    device: str
    dtype: str
    backends: dict[str, str] = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    cache: list[str] = field(default_factory=list)
    others: dict[str, PatchReport] = field(default_factory=dict)  # a pipeline's other transformers, by attribute

    def __repr__(self) -> str:
        rows = [("family", f"{self.family} ({self.transformer_class})"), ("device", f"{self.device}, {self.dtype}")]
        rows += [(f"backend: {op}", why) for op, why in self.backends.items()]
        rows.append(("replaced", f"{len(self.replaced)} module attributes"))
        rows += [("", item) for item in self.replaced]
        rows += [("cache", line) for line in self.cache] or [("cache", "off")]
        rows += [("eager fallback", item) for item in self.fallbacks] or [("eager fallback", "none")]
        width = max(len(key) for key, _ in rows)
        lines = [f"{key:<{width}}  {value}" for key, value in rows]
        for name, other in self.others.items():
            lines += [f"{name}:", *(f"  {line}" for line in repr(other).splitlines())]
        return "\n".join(lines)


@dataclass
class _Arguments:
    """What ``patch`` was asked for, normalized: ``kernels`` as one switch per op, ``cache`` as a config."""

    kernels: dict[str, bool]
    backend: str
    cache: Optional[CacheConfig]
    cuda_graphs: object

    def differences(self, asked: _Arguments) -> list[str]:
        """``name=asked (patched with: before)`` for each argument ``asked`` gives differently."""
        return [f"{f.name}={getattr(asked, f.name)!r} (patched with: {getattr(self, f.name)!r})"
                for f in fields(self) if getattr(self, f.name) != getattr(asked, f.name)]  # fmt: skip


@dataclass
class _PatchState:
    report: PatchReport
    patcher: Patcher
    arguments: _Arguments
    cache: Optional[StepCache] = None


def patch(
    pipe_or_transformer,
    *,
    kernels: Union[bool, Mapping[str, bool]] = True,
    backend: str = "auto",
    cache=None,
    cuda_graphs: Union[bool, str, graphs.GraphConfig] = "auto",
) -> PatchReport:
    """Swap the fused ops into a diffusers pipeline's transformer (or a transformer) in place.

    ``kernels``: True (every fused op), False (none: diffusers' eager modules, e.g. under a step cache), or
    per-op switches ``{"norm": bool, "rope": bool, "attention": bool}`` (a missing key is on): "norm" the
    blocks' norm / modulate / gated residual ops (the block forwards), "rope" the per-head q/k norm + RoPE
    (``qk_norm_rope``), "attention" ``joint_attention``; an op switched off runs diffusers' own computation,
    so a difference can be bisected op by op. ValueError naming an unknown key or a non-bool value.
    ``backend``: "auto" (CUDA tensors: Triton kernels, attention chosen per shape; CPU tensors: the torch
    reference), "triton" (on CPU only under ``TRITON_INTERPRET=1``), "cuda" (the ``_C`` kernels), "torch",
    or "cuda_emu" (the ``_C`` kernel source emulated on CPU; tests only). Raises TypeError for an object
    that is not a supported transformer, ValueError for a model the patcher does not recognise exactly,
    RuntimeError for a backend that cannot run here; in every case the object is left unchanged.
    Patching an already patched model with the same arguments (after normalizing: ``kernels=True`` is every
    switch on, ``cache=0.1`` is ``CacheConfig(threshold=0.1)``) returns the first report and changes nothing;
    with other arguments it raises ValueError naming each one that differs (``unpatch`` first).

    ``cache``: None (off), a threshold (float) or a ``CacheConfig``: step caching (``dit_kernels.cache``):
    skipped steps return the transformer output extrapolated from computed ones, whatever the blocks run
    (fused or eager); given a pipeline, its state resets at each pipeline call. TypeError/ValueError for a bad value, before anything changes.

    ``cuda_graphs``: "auto" (default) replays the forward from CUDA graphs captured per input layout when
    the model is on CUDA, and does nothing elsewhere; True also reports why not on another device; a
    ``dit_kernels.graphs.GraphConfig``: as True, with that config; False never (``dit_kernels.graphs``: a cached
    step that skips replays nothing; with ``CacheConfig(cfg="per_half")``, one graph per block).

    A pipeline with several transformers (Wan 2.2 A14B: ``transformer`` for the high-noise steps,
    ``transformer_2`` for the low-noise ones) has each patched with these arguments, each with its own step
    cache state (the switch between them is a new start for the second, not a skip); the report is the
    first one's, with the others' in ``others``. If one is refused, none stays patched."""
    found = _find_transformers(pipe_or_transformer)
    reports, patched_now = {}, []
    try:
        for name, transformer in found:
            fresh = _STATE not in transformer.__dict__
            reports[name] = _patch_transformer(transformer, pipe_or_transformer, kernels, backend, cache, cuda_graphs)
            if fresh:
                patched_now.append(transformer)
    except BaseException:
        for transformer in reversed(patched_now):
            _unpatch_transformer(transformer)
        raise
    first, *others = reports.values()
    first.others = dict(zip(list(reports)[1:], others))
    return first


def _patch_transformer(transformer: nn.Module, pipe_or_transformer, kernels, backend: str, cache,
                       cuda_graphs) -> PatchReport:  # fmt: skip
    """``patch`` on one transformer (``pipe_or_transformer``: what the user passed, for the scheduler)."""
    asked = _Arguments(_switches(kernels), backend, as_config(cache), cuda_graphs)
    state = transformer.__dict__.get(_STATE)
    if state is not None:  # same arguments: nothing to do; others: refused, the first patch stays as it is
        differences = state.arguments.differences(asked)
        if differences:
            raise ValueError(f"{type(transformer).__name__} is already patched, with other arguments: "
                             f"{'; '.join(differences)}. Call dit_kernels.unpatch first, then patch again")  # fmt: skip
        return state.report
    family = family_of(transformer)
    if family is None:
        raise TypeError(_unsupported(transformer))
    device, dtype = _check_parameters(transformer, family.fp32_modules)
    switches = asked.kernels
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKEND_CHOICES}")
    graphs.check_option(cuda_graphs)
    config = asked.cache
    family.validate(transformer)
    if config is not None:
        validate_cache(transformer, family.blocks, config)
    ops, why = _op_backends(backend, device, switches)
    patcher = Patcher(ops)
    patcher.name_modules(transformer)
    report = PatchReport(family.name, type(transformer).__name__, str(device), str(dtype).removeprefix("torch."))
    step_cache = None if config is None else StepCache(transformer, family.blocks, config)
    try:
        if any(switches.values()):
            family.apply(transformer, patcher)
        # before the cache attaches: its forward wraps the runner; per-half, each block's runner sits inside
        # the cache's block wrapper
        graphs.apply(transformer, patcher, cuda_graphs, device, None if step_cache is None else step_cache.wrapped_blocks or None)
        if step_cache is not None:  # after the kernel swaps: it wraps the fused block forwards
            pipe = None if pipe_or_transformer is transformer else pipe_or_transformer
            scheduler = getattr(pipe, "scheduler", None)
            step_cache.attach(transformer, patcher, scheduler, pipe)
            report.cache = step_cache.describe(pipeline=scheduler is not None)
    except BaseException:
        patcher.undo()
        raise
    report.backends, report.replaced, report.fallbacks = why, patcher.replaced, patcher.fallbacks
    transformer.__dict__[_STATE] = _PatchState(report, patcher, asked, step_cache)
    for item in patcher.fallbacks:
        log.warning("dit_kernels.patch: eager fallback: %s", item)
    return report


def unpatch(pipe_or_transformer) -> None:
    """Restore every module attribute ``patch`` replaced (on each transformer of a pipeline, the last patched
    first, so that wrappers of shared objects such as the scheduler unwind in order); a model that is not
    patched is left as is."""
    for _, transformer in reversed(_find_transformers(pipe_or_transformer)):
        _unpatch_transformer(transformer)


def _unpatch_transformer(transformer: nn.Module) -> None:
    state = transformer.__dict__.pop(_STATE, None)
    if state is not None:
        state.patcher.undo()


def is_patched(pipe_or_transformer) -> bool:
    """Whether the transformer (every transformer of a pipeline) is patched."""
    return all(_STATE in t.__dict__ for _, t in _find_transformers(pipe_or_transformer))


def patch_report(pipe_or_transformer) -> Optional[PatchReport]:
    state = _find_transformer(pipe_or_transformer).__dict__.get(_STATE)
    return None if state is None else state.report


def cache_stats(pipe_or_transformer) -> dict:
    """The step cache's counts: totals (steps, blocks_computed, blocks_skipped, hit_rate) and per call
    (the last 64) the same plus the per-step decision trace (step, branch, group, decision, reason,
    the planned interval, and on a computed step the miss of its extrapolated output). ValueError when the
    model is not patched with a cache."""
    return _step_cache(pipe_or_transformer).stats()


def reset_cache(pipe_or_transformer, num_steps: Optional[int] = None) -> None:
    """Start a new call of the step cache (a bare transformer's next sampling loop): forget every cached
    output; ``num_steps`` turns on the final-steps rule."""
    _step_cache(pipe_or_transformer).reset(num_steps)


@contextlib.contextmanager
def cache_session(pipe_or_transformer, num_steps: Optional[int] = None):
    """``with cache_session(transformer, num_steps=50): <sampling loop>``: the loop is one call of the
    step cache, reset on entry and on exit (nothing cached leaks to the next loop)."""
    step_cache = _step_cache(pipe_or_transformer)
    step_cache.reset(num_steps)
    try:
        yield step_cache
    finally:
        step_cache.reset()


def _step_cache(pipe_or_transformer) -> StepCache:
    state = _find_transformer(pipe_or_transformer).__dict__.get(_STATE)
    if state is None or state.cache is None:
        raise ValueError("this model is not patched with a step cache: dit_kernels.patch(..., cache=threshold)")
    return state.cache


# ----------------------------------------------------------------------------------------- checks


def _find_transformer(obj) -> nn.Module:
    """The transformer, or a pipeline's first one (the one ``patch_report`` and the cache calls read: pass
    ``pipe.transformer_2`` itself for the other)."""
    return _find_transformers(obj)[0][1]


def _find_transformers(obj) -> list[tuple[str, nn.Module]]:
    try:
        return find_transformers(obj)
    except TypeError:
        raise TypeError(_unsupported(obj)) from None


def _unsupported(obj) -> str:
    what = "None" if obj is None else type(obj).__name__
    return (
        f"dit_kernels.patch cannot patch {what}: it takes a transformer of a supported class, or a diffusers "
        f"pipeline whose `.transformer` is one. Supported: {', '.join(supported_classes())}"
    )


def _check_parameters(transformer: nn.Module, fp32_modules: tuple[str, ...] = ()) -> tuple[torch.device, torch.dtype]:
    """One device (not meta) and one floating dtype, except the fp32 parameters diffusers keeps when it loads
    a model in fp16/bf16 (the class's ``_keep_in_fp32_modules``), accepted where only a fused op that
    computes in fp32 reads them (a norm's weight and bias) or where the family takes them in fp32 as
    diffusers does (``Family.fp32_modules``); ValueError naming the module otherwise."""
    tensors = list(transformer.parameters()) + list(transformer.buffers())
    devices = {t.device for t in tensors}
    name = type(transformer).__name__
    if any(d.type == "meta" for d in devices):
        raise ValueError(f"{name} has parameters on the meta device; load its weights before dit_kernels.patch")
    if len(devices) != 1:
        raise ValueError(f"{name} has parameters on several devices {sorted(map(str, devices))}; move it to one")
    kept = _kept_in_fp32(transformer)
    dtypes = {t.dtype for module_name, t in _named_floats(transformer) if id(t) not in kept.get(module_name, {})}
    if len(dtypes) != 1:
        names = sorted(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} mixes parameter dtypes {names}; cast it to one dtype (e.g. .to(torch.bfloat16))")
    dtype = dtypes.pop()
    for module_name, tensors in kept.items():
        module = transformer.get_submodule(module_name)
        family_takes = all(any(k in name.split(".") for k in fp32_modules) for name in tensors.values())
        if not (_is_norm(module) or family_takes) and any(t.dtype != dtype for t in _own_floats(module)):
            raise ValueError(
                f"{name}.{module_name} ({type(module).__name__}) is kept in float32 (_keep_in_fp32_modules) in a "
                f"{str(dtype).removeprefix('torch.')} model; the fused path reads fp32 parameters only in norms "
                "(computed in fp32): cast it to the model dtype"
            )
    return devices.pop(), dtype


def _is_norm(module: nn.Module) -> bool:
    """A norm whose parameters the fused ops read, computing in fp32 whatever the parameters' dtype
    (diffusers' FP32LayerNorm is a LayerNorm)."""
    from diffusers.models.normalization import RMSNorm

    return isinstance(module, (nn.LayerNorm, nn.RMSNorm, RMSNorm))


def _named_floats(root: nn.Module):
    """(owning module's qualified name, tensor) for every floating parameter and buffer."""
    for module_name, module in root.named_modules():
        for t in _own_floats(module):
            yield module_name, t


def _own_floats(module: nn.Module) -> list[torch.Tensor]:
    return [t for _, t in _own_named_floats(module)]


def _own_named_floats(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return [(name, t) for name, t in tensors if t.is_floating_point()]


def _kept_in_fp32(transformer: nn.Module) -> dict[str, dict[int, str]]:
    """Per owning module's qualified name (in module order), its fp32 tensors that diffusers' loading keeps in
    fp32 (id -> qualified name): those whose qualified name has a component in the class's
    ``_keep_in_fp32_modules`` (diffusers' rule, ``load_model_dict_into_meta``, which matches parameter names
    too: Wan's ``blocks.0.scale_shift_table`` as well as ``blocks.0.norm2.weight``)."""
    keep = getattr(type(transformer), "_keep_in_fp32_modules", None) or ()
    kept: dict[str, dict[int, str]] = {}
    for module_name, module in transformer.named_modules():
        for name, t in _own_named_floats(module):
            qualified = f"{module_name}.{name}".lstrip(".")
            if t.dtype == torch.float32 and any(k in qualified.split(".") for k in keep):
                kept.setdefault(module_name, {})[id(t)] = qualified
    return kept


def _switches(kernels) -> dict[str, bool]:
    """``kernels`` as one bool per op of ``OPS``; ValueError naming unknown keys or non-bool values."""
    if isinstance(kernels, bool):
        return dict.fromkeys(OPS, kernels)
    if not isinstance(kernels, Mapping):
        raise ValueError(f"kernels must be True, False or a dict of per-op switches over {OPS}, got {kernels!r}")
    unknown = sorted(map(repr, set(kernels) - set(OPS)))
    if unknown:
        raise ValueError(f"kernels: unknown op(s) {', '.join(unknown)}; the switches are {OPS}")
    not_bool = {op: value for op, value in kernels.items() if not isinstance(value, bool)}
    if not_bool:
        raise ValueError(f"kernels: switches must be True or False, got {not_bool}")
    return {op: kernels.get(op, True) for op in OPS}


def _op_backends(backend: str, device: torch.device, switches: dict[str, bool]) -> tuple[OpBackends, dict[str, str]]:
    """Resolve ``backend`` for this device (RuntimeError if it cannot run) and say why each op uses what."""
    if not any(switches.values()):
        return OpBackends(EAGER, EAGER, EAGER), dict.fromkeys(OPS, "off (kernels=False): diffusers' eager modules")
    fused = backends.resolve(None if backend == "auto" else backend, device)
    if backend == "auto":
        fused_why = "Triton kernels on CUDA" if fused == "triton" else f"{fused}: the reference ops on {device.type}"
    else:
        fused_why = f"{fused}: asked for"
    attention = fused if backend != "auto" and fused in ("torch", "triton") else None
    attention_why = f"{attention}: same as the fused ops" if attention else "chosen per call (attention_backend)"
    chosen = {"norm": (fused, fused_why), "rope": (fused, fused_why), "attention": (attention, attention_why)}
    off = "off (kernels switch): diffusers' own computation"
    ops = OpBackends(**{op: value if switches[op] else EAGER for op, (value, _) in chosen.items()})
    return ops, {op: why if switches[op] else off for op, (_, why) in chosen.items()}
