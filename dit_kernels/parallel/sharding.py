"""A context-parallel plan (``dit_kernels.parallel.plan``) applied to a transformer with torch module hooks.

diffusers' sharders do the work (``EquipartitionSharder``: each rank keeps the rank-th of P equal chunks;
the gather is an all-gather); the hooks are torch's forward pre-hooks / forward hooks rather than the
diffusers ``HookRegistry`` that ``ModelMixin.enable_parallelism`` uses. The registry installs its wrapper
as the module's instance ``forward``, the attribute ``dit_kernels.patch`` replaces (fused forwards, the
step cache, CUDA-graph runners) and restores on ``unpatch``; torch's hooks run around whatever
``forward`` is, so parallelism and patching stack in either order and undo independently.

A length P does not divide is refused at the split with a ValueError naming it: every rank holds the same
unsplit tensor there, so every rank raises, before any collective (no rank is left waiting).
"""

from __future__ import annotations

import functools
import inspect
from typing import Union

from diffusers.hooks.context_parallel import EquipartitionSharder, _get_submodule_by_name
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.hooks import RemovableHandle

from dit_kernels.parallel.plan import Local, Plan, Repeated

Spec = Union[ContextParallelInput, Repeated]
Specs = Union[Spec, tuple[Spec, ...], list[Spec]]


def check_plan(transformer: nn.Module, plan: Plan) -> None:
    """ValueError naming the first entry of ``plan`` that does not fit ``transformer`` (a module it lacks,
    an input its forward does not take, an output spec on an input or the other way round, ``local()`` on
    a module that is no attention)."""
    for name, entry in plan.items():
        modules = _modules(transformer, name)
        if isinstance(entry, Local) and not all(is_attention(m) for m in modules):
            raise ValueError(f"context-parallel plan entry {name!r}: local() names a module that is no attention")
        if isinstance(entry, (ContextParallelOutput, Local)) or _all_outputs(entry):
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"context-parallel plan entry {name!r}: {entry!r} is neither a dict of splits nor gathers")
        for key, specs in entry.items():
            outputs = {getattr(spec, "split_output", False) for spec in _as_tuple(specs)}
            if outputs != {isinstance(key, int)}:
                raise ValueError(f"context-parallel plan entry {name!r}[{key!r}]: an int key names an output "
                                 "(split_output=True), a str key an input (split_output=False)")  # fmt: skip
            missing = [m for m in modules if isinstance(key, str) and key not in _parameters(type(m))]
            if missing:
                raise ValueError(f"context-parallel plan entry {name!r}: {type(missing[0]).__name__}.forward "
                                 f"takes no argument {key!r}")  # fmt: skip


def apply_plan(transformer: nn.Module, plan: Plan, mesh: DeviceMesh) -> list[RemovableHandle]:
    """Register the plan's splits and gathers over ``mesh`` (the flattened context-parallel mesh) on
    ``transformer``'s modules; returns the hook handles (remove them to undo)."""
    handles = []
    for name, entry in plan.items():
        where = name or type(transformer).__name__
        for module in _modules(transformer, name) if not isinstance(entry, Local) else ():
            if isinstance(entry, dict):
                inputs = {key: specs for key, specs in entry.items() if isinstance(key, str)}
                outputs = {key: specs for key, specs in entry.items() if isinstance(key, int)}
                if inputs:
                    hook = functools.partial(_split_inputs, inputs, mesh, where)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                if outputs:
                    hook = functools.partial(_split_outputs, outputs, mesh, where)
                    handles.append(module.register_forward_hook(hook))
            else:
                handles.append(module.register_forward_hook(functools.partial(_gather, _as_tuple(entry), mesh)))
    return handles


# ----------------------------------------------------------------------------------------- hooks


def _split_inputs(specs: dict, mesh: DeviceMesh, where: str, module: nn.Module, args: tuple, kwargs: dict):
    args = list(args)
    params = _parameters(type(module))
    for name, spec in specs.items():
        if name in kwargs:
            kwargs[name] = _shard_value(kwargs[name], spec, mesh, f"{where} input {name!r}")
            continue
        index = params.index(name)
        if index < len(args):
            args[index] = _shard_value(args[index], spec, mesh, f"{where} input {name!r}")
    return tuple(args), kwargs


def _split_outputs(specs: dict, mesh: DeviceMesh, where: str, module: nn.Module, args: tuple, output):
    single = isinstance(output, Tensor)
    outputs = [output] if single else list(output)
    for index, spec in specs.items():
        outputs[index] = _shard(outputs[index], spec, mesh, f"{where} output {index}")
    return outputs[0] if single else type(output)(outputs)


def _gather(specs: tuple[ContextParallelOutput, ...], mesh: DeviceMesh, module: nn.Module, args: tuple, output):
    single = isinstance(output, Tensor)
    outputs = [output] if single else list(output)
    for index, spec in enumerate(specs):
        if spec.expected_dims is None or outputs[index].dim() == spec.expected_dims:
            outputs[index] = EquipartitionSharder.unshard(outputs[index], spec.gather_dim, mesh)
    return outputs[0] if single else type(output)(outputs)


def _shard_value(value, specs: Specs, mesh: DeviceMesh, what: str):
    """A tensor argument, or a tuple of them (one spec each); None passes."""
    if value is None or isinstance(value, Tensor):
        return value if value is None else _shard(value, specs, mesh, what)
    specs = _as_tuple(specs)
    if len(specs) != len(value):
        raise ValueError(f"context parallelism: {what} has {len(value)} elements, the plan {len(specs)}")
    return type(value)(_shard(v, s, mesh, f"{what}[{i}]") for i, (v, s) in enumerate(zip(value, specs)))


def _shard(x: Tensor, spec: Spec, mesh: DeviceMesh, what: str) -> Tensor:
    """This rank's chunk of ``x`` along the spec's dim (``x`` whole when its rank is not ``expected_dims``);
    for ``Repeated``, every P-th row."""
    if spec.expected_dims is not None and x.dim() != spec.expected_dims:
        return x
    dim = spec.dim if isinstance(spec, Repeated) else spec.split_dim
    size, ranks = x.shape[dim], mesh.size()
    if size % ranks:
        raise ValueError(f"context parallelism over {ranks} ranks: {what} {tuple(x.shape)} has {size} positions "
                         f"along dim {dim}, which {ranks} does not divide; choose sizes (image side, frames, "
                         f"text length) that make it a multiple of {ranks}")  # fmt: skip
    if isinstance(spec, Repeated):
        return x[(slice(None),) * dim + (slice(None, None, ranks),)]
    return EquipartitionSharder.shard(x, dim, mesh)


# ----------------------------------------------------------------------------------------- helpers


def sharded_attentions(transformer: nn.Module, plan: Plan) -> list[tuple[str, nn.Module]]:
    """The attention modules (diffusers' ``Attention`` / ``AttentionModuleMixin``: a processor and heads)
    that attend over the split sequence: all but those the plan marks ``local()``."""
    local = {id(m) for name, entry in plan.items() if isinstance(entry, Local) for m in _modules(transformer, name)}
    return [(n, m) for n, m in transformer.named_modules() if is_attention(m) and id(m) not in local]


def is_attention(module: nn.Module) -> bool:
    return hasattr(module, "processor") and hasattr(module, "heads")


def _modules(transformer: nn.Module, name: str) -> list[nn.Module]:
    try:
        found = _get_submodule_by_name(transformer, name)
    except ValueError as err:
        what = type(transformer).__name__
        raise ValueError(f"context-parallel plan entry {name!r} does not fit {what}: {err}") from None
    return found if isinstance(found, list) else [found]


def _all_outputs(entry) -> bool:
    return isinstance(entry, (list, tuple)) and all(isinstance(spec, ContextParallelOutput) for spec in entry)


def _as_tuple(specs) -> tuple:
    return tuple(specs) if isinstance(specs, (list, tuple)) else (specs,)


@functools.lru_cache(maxsize=None)
def _parameters(cls: type) -> tuple[str, ...]:
    """The parameter names of ``cls.forward`` after ``self``, in order."""
    return tuple(inspect.signature(cls.forward).parameters)[1:]

