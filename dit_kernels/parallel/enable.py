"""``enable_parallelism`` / ``disable_parallelism``: a transformer's sequence sharded over the ranks of
torch.distributed (context parallelism: Ulysses and / or Ring attention) on diffusers' engine, in either
order with ``dit_kernels.patch``.

After every check has passed (nothing changes before), on each rank:

- the (ring, ulysses) device mesh and diffusers' ``ParallelConfig``, kept where diffusers keeps it
  (``transformer._parallel_config``) and given to every attention processor over the split sequence
  (``processor._parallel_config``; not to those the plan marks ``local()``):
  diffusers' own processors (FLUX, Wan) dispatch through it; dit_kernels' fused processors read it, also
  from the diffusers processor they wrap, so a ``patch`` made later sees it;
- the family's plan (``Family.parallel_plan``, stated in its ``models/<family>.py``) as torch hooks
  (``parallel.sharding``): inputs split along the sequence, the output gathered;
- a check before each forward that every attention processor reaches the parallel attention: diffusers'
  legacy ``Attention`` processors (DiT, PixArt, SD3, HunyuanDiT) call SDPA directly, so those models run in
  parallel once patched; diffusers' dispatching processors need a backend that supports it (Ring: one
  returning the log-sum-exp, which SDPA does not).

The step cache needs nothing from here: it decides from the transformer's output, which the plan gathers
whole on every rank, so every rank computes or skips the same steps.

Why not ``ModelMixin.enable_parallelism``: it places each rank on ``rank % torch.accelerator.device_count()``,
a division by zero on a machine without an accelerator (CPU over gloo), and installs its hooks as instance
``forward`` attributes, which patching replaces. Here the mesh is built on the model's own device type, so
the same call runs on CPU (gloo) and CUDA (NCCL), and the hooks are torch's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.hooks import RemovableHandle

from dit_kernels.models import families, family_of
from dit_kernels.parallel.plan import Plan
from dit_kernels.parallel.sharding import apply_plan, check_plan, sharded_attentions
from dit_kernels.patching import find_transformer, find_transformers

_STATE = "_dit_kernels_parallel"
# The process-group backend that moves tensors of each device type.
PROCESS_GROUP_BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
# diffusers backends whose forward op cannot return the log-sum-exp Ring attention merges with.
_NO_LSE = (AttentionBackendName.NATIVE, AttentionBackendName._NATIVE_MATH)


@dataclass
class _ParallelState:
    config: ParallelConfig
    attentions: list[tuple[str, nn.Module]]
    handles: list[RemovableHandle]
    processors: list[tuple[object, object]]  # (processor, its _parallel_config before)


def enable_parallelism(pipe_or_transformer, *, ulysses_degree: int = 1, ring_degree: int = 1) -> ParallelConfig:
    """Shard ``pipe_or_transformer``'s transformer (a pipeline's every transformer: Wan 2.2 A14B's
    ``transformer_2`` too, on the same mesh) over every rank of the default process group:
    ``ulysses_degree`` x ``ring_degree`` must equal the world size (and exceed 1). Call it on every rank,
    with the same model and arguments, after ``torch.distributed.init_process_group`` ("gloo" for CPU
    tensors, "nccl" for CUDA; under ``torchrun`` the environment gives rank and world size); before or after
    ``dit_kernels.patch``. Each rank then takes the whole inputs and returns the whole output.

    TypeError for an object that is not a supported transformer; ValueError for degrees that do not fit the
    world size or the attention heads (Ulysses splits heads), a family without a context-parallel plan, a
    process-group backend that cannot move the model's tensors, or a model that is already parallel;
    RuntimeError when torch.distributed is not initialized. In every case nothing has changed. A sequence
    length the ranks do not divide is refused at the forward that brings it (ValueError on every rank)."""
    transformers = [module for _, module in find_transformers(pipe_or_transformer)]
    plans = [_plan_of(transformer) for transformer in transformers]
    devices = {_check(transformer, plan, ulysses_degree, ring_degree) for transformer, plan in zip(transformers, plans)}
    if len(devices) != 1:
        raise ValueError(f"the pipeline's transformers are on {sorted(map(str, devices))}; put them on one device")
    device = devices.pop()
    mesh = init_device_mesh(device.type, (ring_degree, ulysses_degree), mesh_dim_names=("ring", "ulysses"))
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=ring_degree,
                                                                          ulysses_degree=ulysses_degree, mesh=mesh))
    config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=mesh)
    for transformer, plan in zip(transformers, plans):
        _enable(transformer, plan, config)
    return config


def _enable(transformer: nn.Module, plan: Plan, config: ParallelConfig) -> None:
    """One transformer's settings and hooks (the module docstring's list), recorded for ``disable_parallelism``."""
    attentions = sharded_attentions(transformer, plan)
    processors = [(m.processor, getattr(m.processor, "_parallel_config", None)) for _, m in attentions]
    for processor, _ in processors:
        processor._parallel_config = config
    state = _ParallelState(config, attentions, [], processors)
    state.handles.append(transformer.register_forward_pre_hook(functools.partial(_check_processors, state)))
    state.handles += apply_plan(transformer, plan, config.context_parallel_config._flattened_mesh)
    transformer._parallel_config = config
    transformer.__dict__[_STATE] = state


def disable_parallelism(pipe_or_transformer) -> None:
    """Undo ``enable_parallelism`` on this rank (hooks, processor settings, the transformers' config); the
    process groups stay. A transformer that is not parallel is left as is."""
    for _, transformer in find_transformers(pipe_or_transformer):
        state = transformer.__dict__.pop(_STATE, None)
        if state is None:
            continue
        for handle in state.handles:
            handle.remove()
        for processor, before in state.processors:
            processor._parallel_config = before
        transformer._parallel_config = None


def parallel_config(pipe_or_transformer) -> Optional[ParallelConfig]:
    """The ``ParallelConfig`` ``enable_parallelism`` set on this transformer (a pipeline's first), or None."""
    state = find_transformer(pipe_or_transformer).__dict__.get(_STATE)
    return None if state is None else state.config


# ----------------------------------------------------------------------------------------- checks


def _plan_of(transformer: nn.Module) -> Plan:
    family = family_of(transformer)
    with_plan = [f"{cls.__name__} ({f.name})" for f in families() if f.parallel_plan for cls in f.classes]
    if family is None:
        raise TypeError(f"dit_kernels.enable_parallelism: {type(transformer).__name__} is not a supported "
                        f"transformer; context parallelism runs on {', '.join(with_plan)}")  # fmt: skip
    if family.parallel_plan is None:
        raise ValueError(f"dit_kernels.enable_parallelism: family {family.name} has no context-parallel plan; "
                         f"families with one: {', '.join(with_plan)}")  # fmt: skip
    check_plan(transformer, family.parallel_plan)
    return family.parallel_plan


def _check(transformer: nn.Module, plan: Plan, ulysses_degree: int, ring_degree: int) -> torch.device:
    """Every refusal that needs no collective; returns the model's device."""
    name = type(transformer).__name__
    if getattr(transformer, "_parallel_config", None) is not None:
        raise ValueError(f"{name} is already parallel ({transformer._parallel_config}); "
                         "dit_kernels.disable_parallelism(...) first")  # fmt: skip
    for label, degree in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
        if type(degree) is not int or degree < 1:
            raise ValueError(f"{label} must be an int >= 1, got {degree!r}")
    if ulysses_degree * ring_degree == 1:
        raise ValueError("ulysses_degree * ring_degree is 1: nothing to run in parallel")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group('gloo' "
                           "for CPU tensors, 'nccl' for CUDA) on every rank first (torchrun sets rank and world size)")
    world = dist.get_world_size()
    if ulysses_degree * ring_degree != world:
        raise ValueError(f"ulysses_degree {ulysses_degree} x ring_degree {ring_degree} = "
                         f"{ulysses_degree * ring_degree} does not match the world size {world}")  # fmt: skip
    device = _device(transformer)
    backend, needed = str(dist.get_backend()), PROCESS_GROUP_BACKENDS.get(device.type)
    if needed is None or needed not in backend:
        served = ", ".join(f"{d} ({b})" for d, b in PROCESS_GROUP_BACKENDS.items())
        raise ValueError(f"{name} is on {device.type}, which the process group backend {backend!r} cannot serve; "
                         f"context parallelism runs on {served}")
    for module_name, attention in sharded_attentions(transformer, plan):
        if attention.heads % ulysses_degree:
            raise ValueError(f"ulysses_degree {ulysses_degree} does not divide the {attention.heads} attention heads "
                             f"of {name}.{module_name} (Ulysses gives each rank a share of the heads)")  # fmt: skip
    return device


def _device(transformer: nn.Module) -> torch.device:
    devices = {t.device for t in (*transformer.parameters(), *transformer.buffers())}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        raise ValueError(f"{type(transformer).__name__} has parameters on {sorted(map(str, devices))}; context "
                         "parallelism needs the whole model on this rank's one device, weights loaded")  # fmt: skip
    return devices.pop()


def _check_processors(state: _ParallelState, transformer: nn.Module, args: tuple) -> None:
    """A forward pre-hook: ValueError (on every rank, before any collective) when an attention processor
    would not run the parallel attention."""
    ring = state.config.context_parallel_config.ring_degree > 1
    for module_name, attention in state.attentions:
        processor, where = attention.processor, f"{type(transformer).__name__}.{module_name}"
        if not hasattr(type(processor), "_parallel_config"):
            raise ValueError(f"{where} runs {type(processor).__name__}, which calls attention directly and does not "
                             "reach context parallelism; dit_kernels.patch(...) the model to run it in parallel "
                             "(its attention processors do)")  # fmt: skip
        if not type(processor).__module__.startswith("diffusers."):
            continue  # dit_kernels' processors: their own local op (with log-sum-exp for Ring)
        backend = processor._attention_backend or _AttentionBackendRegistry.get_active_backend()[0]
        backend = AttentionBackendName(backend)
        if not _AttentionBackendRegistry._is_context_parallel_available(backend) or (ring and backend in _NO_LSE):
            raise ValueError(f"{where}: diffusers' attention backend {backend.value!r} cannot run "
                             f"{'ring' if ring else 'context-parallel'} attention; dit_kernels.patch(...) the model "
                             "(its attention can) or set a backend that does (e.g. set_attention_backend('flash'))")
