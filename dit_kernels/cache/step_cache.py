"""The step cache on a transformer: a transformer-forward wrapper that computes or predicts each call's
output, block-forward wrappers for half-batch runs, and the per-call state they share.

``attach`` wraps, through the patch's ``Patcher`` (so ``unpatch`` removes them, after nothing else):

- the transformer's forward: it opens a step, takes each group's decision (``policy.decide``) before
  anything runs, and returns the predicted output where the groups skip;
- with ``cfg="per_half"``, every block's forward (whatever it is: diffusers' own or a fused one from the
  family patcher), for steps where one half computes and the other skips;
- ``pipe.scheduler.set_timesteps`` when patching a pipeline: each pipeline call starts with it, so it
  resets the state and tells the cache the call's step count (``len(scheduler.timesteps)``).

What is cached is the transformer's output (its first return value: the sample). Per call:

- every group skipping: nothing runs; the call returns the predicted output, in the format of the last
  computed call's (a tuple, or the output dataclass with its ``sample`` replaced);
- every group computing: the transformer runs as usual, and each group's rows of the output become a
  node (the output itself is returned untouched);
- mixed (CFG per half): the blocks run on the computing half's rows (batch arguments sliced) and return
  stand-ins (fresh views of their full-batch input); any later argument that is a stand-in, a HunyuanDiT
  long skip included, is swapped for the real half-batch tensor it stands for; the last block returns the
  computed rows joined with the other half's input rows, the transformer's tail runs on the full batch,
  and the call's output keeps the computed half's rows and takes the predicted ones for the other.

Steps: consecutive transformer calls with the same timestep are branches of one step (sequential CFG,
e.g. FLUX's true CFG); each branch keeps its own groups. The state resets (a new call in the stats)
at ``set_timesteps``, ``reset``/``cache_session``, and when a call's tensor shapes/dtypes or ``return_dict``
change or its timestep rises above the previous step's (a new sampling loop on a bare transformer).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import math
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from dit_kernels.cache.config import CacheConfig
from dit_kernels.cache.policy import CallStats, Group, decide, summary, warn_if_never_hit
from dit_kernels.patching import BlockLayout, Patcher

KEEP_CALLS = 64  # calls kept in the stats
Streams = tuple[Optional[Tensor], ...]


def validate(transformer: nn.Module, layout: BlockLayout, config: CacheConfig) -> None:
    """ValueError when the cache cannot wrap ``transformer`` (blocks as in ``layout``, its family's) with
    ``config`` (before anything changes)."""
    if layout.reshapes and config.cfg == "per_half":
        raise ValueError(f"CacheConfig(cfg='per_half') runs the blocks on half the batch, which "
                         f"{type(transformer).__name__} does not allow (it reshapes the residual stream between "
                         "its blocks); use cfg='joint'")  # fmt: skip


class StepCache:
    """The cache's state for one patched transformer, whose blocks are as ``layout`` (its family's) says
    (see the module docstring)."""

    def __init__(self, transformer: nn.Module, layout: BlockLayout, config: CacheConfig):
        self.config = config
        self.layout = layout
        self.blocks = self.layout.blocks(transformer)
        self.calls: collections.deque[CallStats] = collections.deque(maxlen=KEEP_CALLS)
        self.run: Optional[_Run] = None
        self.num_steps: Optional[int] = None
        self._pipe: Optional[weakref.ref] = None
        self.warned = False
        self._clear()

    # ------------------------------------------------------------------------------------- state

    def _clear(self) -> None:
        self.branches: dict[int, list[Group]] = {}
        self.key: Optional[tuple] = None
        self.shell = None  # the last computed call's output: the format a skipped call's output takes
        self.timestep: Optional[float] = None
        self.step, self.branch = -1, 0
        self.current: Optional[CallStats] = None

    def reset(self, num_steps: Optional[int] = None) -> None:
        """Forget every computed output and plan; the next transformer call is step 0 of a new call
        of ``num_steps`` steps (None: unknown, the final-steps rule is off)."""
        self.num_steps = num_steps
        self._clear()

    def stats(self) -> dict:
        return summary(self.config, list(self.calls))

    def groups(self, branch: int, batch: int) -> list[Group]:
        if branch not in self.branches:
            halves = self.config.cfg == "per_half" and batch % 2 == 0
            rows = [slice(0, batch // 2), slice(batch // 2, batch)] if halves else [slice(None)]
            labels = ["first half", "second half"] if halves else ["batch"]
            self.branches[branch] = [Group(label, r) for label, r in zip(labels, rows)]
        return self.branches[branch]

    def _call(self) -> CallStats:
        if self.current is None:
            self.current = CallStats(self.num_steps)
            self.calls.append(self.current)
        return self.current

    def _begin(self, named: dict) -> Optional[_Run]:
        """A transformer call: its step and branch, after any reset it implies; None runs it uncached."""
        bypass = [name for name, value in self.layout.bypass_values if name in named and named[name] == value]
        if bypass or any(named.get(name) is not None for name in self.layout.bypass_args):
            call = self._call()
            call.bypassed_calls += 1
            call.blocks_computed += len(self.blocks)
            return None
        key = tuple((name, v.shape, v.dtype, v.device) for name, v in named.items() if isinstance(v, Tensor))
        key += (named.get("return_dict", True),)
        t = named.get("timestep")
        t = None if t is None else torch.as_tensor(t).float().max().item()
        rose = t is not None and self.timestep is not None and t > self.timestep
        if self.key is not None and (key != self.key or rose):
            self.reset(self._steps_of_pipeline() or self.num_steps)
        self.key = key
        if t is None or t != self.timestep:
            self.step, self.branch, self.timestep = self.step + 1, 0, t
            if self.step == 0:  # a pipeline's second transformer joins mid-loop (Wan 2.2 A14B): its steps left
                self.num_steps = self._steps_of_pipeline() or self.num_steps
            self._call().steps += 1
        else:
            self.branch += 1
        return _Run(self, self.step, self.branch, named["hidden_states"].shape[0])

    # ------------------------------------------------------------------------------------- wrappers

    def attach(self, transformer: nn.Module, patcher: Patcher, scheduler=None, pipe=None) -> None:
        """Wrap the transformer, the blocks for per-half CFG (``wrapped_blocks``) and (given) the scheduler's
        set_timesteps / set_begin_index through ``patcher``; ``pipe``: the pipeline, whose scheduler of the
        moment gives the step count on an automatic reset (a scheduler swapped in after ``patch`` has no
        hook)."""
        self._pipe = None if pipe is None else weakref.ref(pipe)
        for index, block in enumerate(self.wrapped_blocks):
            patcher.set_attr(block, "forward", self._block_forward(index, block), "step cache: half-batch runs")
        patcher.set_attr(transformer, "forward", self._transformer_forward(transformer),
                         "step cache: computes or predicts the output")  # fmt: skip
        if scheduler is not None:
            patcher.set_attr(scheduler, "set_timesteps", self._set_timesteps(scheduler),
                             "step cache: resets at each pipeline call")  # fmt: skip
        if scheduler is not None and hasattr(scheduler, "set_begin_index"):
            patcher.set_attr(scheduler, "set_begin_index", self._set_begin_index(scheduler),
                             "step cache: steps left after an img2img start")  # fmt: skip

    @property
    def wrapped_blocks(self) -> list[nn.Module]:
        """The blocks the cache wraps: all of them for ``cfg="per_half"`` (half-batch runs), else none."""
        return self.blocks if self.config.cfg == "per_half" else []

    def describe(self, pipeline: bool) -> list[str]:
        """The report's cache lines (``pipeline``: the scheduler hook is on)."""
        calls = "at each pipeline call (scheduler.set_timesteps), " if pipeline else (
            "(bare transformer: no step count, so no final-steps rule, unless cache_session(num_steps=...)) ")
        return [repr(self.config), f"skipped steps run none of the {len(self.blocks)} blocks "
                f"({' + '.join(self.layout.block_lists)}): the output is extrapolated from computed steps",
                f"state resets {calls}on new shapes/dtypes/batch or a rising timestep, and by "
                "dit_kernels.reset_cache / cache_session"]  # fmt: skip

    def _block_forward(self, index: int, block: nn.Module) -> Callable:
        original, params = block.forward, _parameter_names(block)

        def forward(*args, **kwargs):
            run = self.run
            if run is None:
                return original(*args, **kwargs)
            return run.block(index, original, params, args, kwargs)

        return forward

    def _transformer_forward(self, transformer: nn.Module) -> Callable:
        original, params = transformer.forward, _parameter_names(transformer)

        def forward(*args, **kwargs):
            run = self._begin(_named(params, args, kwargs))
            if run is not None and not any(run.computing):
                return run.output(self.shell)
            self.run = run
            try:
                out = original(*args, **kwargs)
            finally:
                self.run = None
            return out if run is None else run.output(out)

        return forward

    def _set_timesteps(self, scheduler) -> Callable:
        original = scheduler.set_timesteps

        @functools.wraps(original)  # keeps the signature: pipelines inspect it for `timesteps` / `sigmas`
        def set_timesteps(*args, **kwargs):
            result = original(*args, **kwargs)
            self.reset(steps_left(scheduler))
            return result

        return set_timesteps

    def _set_begin_index(self, scheduler) -> Callable:
        original = scheduler.set_begin_index

        @functools.wraps(original)
        def set_begin_index(*args, **kwargs):
            result = original(*args, **kwargs)
            self.num_steps = steps_left(scheduler)
            if self.current is not None:
                self.current.num_steps = self.num_steps
            return result

        return set_begin_index

    def _steps_of_pipeline(self) -> Optional[int]:
        pipe = None if self._pipe is None else self._pipe()
        return None if pipe is None else steps_left(getattr(pipe, "scheduler", None))


def steps_left(scheduler) -> Optional[int]:
    """Denoising steps a scheduler has ahead: its timesteps from the current one (``step_index`` once it has
    stepped, else ``begin_index``: img2img starts late), one step per ``order`` timesteps (Heun visits each
    but the first twice); None when it has none yet."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    index = getattr(scheduler, "step_index", None)
    start = index if index is not None else getattr(scheduler, "begin_index", None) or 0
    return math.ceil((len(timesteps) - start) / getattr(scheduler, "order", 1))


class _Run:
    """One transformer call: the decision per group, the stand-ins of a half-batch run."""

    def __init__(self, cache: StepCache, step: int, branch: int, batch: int):
        self.cache, self.layout, self.step, self.batch = cache, cache.layout, step, batch
        self.groups = cache.groups(branch, batch)
        call = cache._call()
        decisions = [decide(cache.config, g, step, cache.num_steps) for g in self.groups]
        self.entries = [call.record(step, branch, g, d, len(cache.blocks)) for g, d in zip(self.groups, decisions)]
        self.computing = [d.compute for d in decisions]
        if not cache.warned:
            cache.warned = warn_if_never_hit(cache.config, call)
        self.real: dict[int, Tensor] = {}  # id(stand-in) -> the half-batch tensor it stands for

    def block(self, index: int, original: Callable, params: list[str], args: tuple, kwargs: dict):
        """A block of a call where some group computes: all groups: the block itself; mixed: its run on the
        computing half's rows (see the module docstring)."""
        if all(self.computing):
            return original(*args, **kwargs)
        named = _named(params, args, kwargs)
        rows = self.groups[self.computing.index(True)].rows
        sub_args = [self._rows(name, value, rows) for name, value in zip(params, args)]
        out = original(*sub_args, **{name: self._rows(name, value, rows) for name, value in kwargs.items()})
        streams = self.layout.streams_of(out)
        last = index == len(self.cache.blocks) - 1
        return self.layout.output(self._joined(named, streams) if last else self._stand_ins(named, streams))

    def output(self, out):
        """The call's output: ``out`` (the transformer's own, or the last computed call's on a skipped step)
        with each skipping group's rows of the sample predicted; each computing group keeps its rows as a
        node and records the miss of their prediction."""
        config, sample, parts = self.cache.config, _sample(out), []
        for group, entry, computing in zip(self.groups, self.entries, self.computing):
            rows = sample[group.rows]
            if computing:
                entry["miss"] = group.computed(config, self.step, rows)
            parts.append(rows if computing else group.predicted(self.step, config.order))
        if all(self.computing):
            self.cache.shell = out
            return out
        return _with_sample(out, parts[0] if len(parts) == 1 else torch.cat(parts))

    def _joined(self, named: dict, computed: Streams) -> Streams:
        """The last block's output when one half computed (``computed``, its rows) and the other skips:
        the computed rows and the skipping half's input rows (its output rows are predicted afterwards)."""
        return tuple(None if c is None else torch.cat([c if computing else named[name][group.rows]
                                                       for group, computing in zip(self.groups, self.computing)])
                     for name, c in zip(self.layout.streams, computed))  # fmt: skip

    def _rows(self, name: str, value, rows: slice):
        """A block argument for the half-batch run: the real tensor behind a stand-in, a batch argument's
        rows, anything else unchanged."""
        if not isinstance(value, Tensor):
            return value
        real = self.real.get(id(value))
        if real is not None:
            return real
        if name in self.layout.batch_args and value.dim() and value.shape[0] == self.batch:
            return value[rows]
        return value

    def _stand_ins(self, named: dict, computed: Streams) -> Streams:
        """Full-batch stand-ins for a half-batch block output: fresh views of the block's input, each
        mapped to its real tensor for as long as the stand-in lives."""
        stand_ins = []
        for name, real in zip(self.layout.streams, computed):
            stand_in = named[name].view_as(named[name])
            self.real[id(stand_in)] = real
            weakref.finalize(stand_in, self.real.pop, id(stand_in), None)
            stand_ins.append(stand_in)
        return tuple(stand_ins)


def _sample(out) -> Tensor:
    """A transformer output's sample: the first element of a tuple, else ``.sample``."""
    return out[0] if isinstance(out, tuple) else out.sample


def _with_sample(out, sample: Tensor):
    """``out`` (a tuple, or a diffusers output dataclass) with its sample replaced."""
    return (sample, *out[1:]) if isinstance(out, tuple) else dataclasses.replace(out, sample=sample)


def _parameter_names(module: nn.Module) -> list[str]:
    """The names of ``type(module).forward``'s positional parameters after ``self``."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    return [p.name for p in params if p.kind in kinds]


def _named(params: list[str], args: tuple, kwargs: dict) -> dict:
    return {**dict(zip(params, args)), **kwargs}
