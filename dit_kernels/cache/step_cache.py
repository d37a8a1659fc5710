"""The step cache on a transformer: block-forward wrappers that compute, pass through or replay the
remaining blocks, and the per-call state they share.

``attach`` wraps, through the patch's ``Patcher`` (so ``unpatch`` removes them, after nothing else):

- every block's forward (whatever it is: diffusers' own or a fused one from the family patcher);
- the transformer's forward, which opens a step for the blocks to see (outside a transformer call the
  block wrappers only call through);
- ``pipe.scheduler.set_timesteps`` when patching a pipeline: each pipeline call starts with it, so it
  resets the state and tells the cache the call's step count (``len(scheduler.timesteps)``).

Within one transformer call: the head blocks run; the first remaining block sees the head's output,
measures the head residual and decides (``policy.decide``) per group. All groups computing: every
block runs as usual and the last one records ``output - head output`` per stream. All skipping: the
remaining blocks return their input unchanged (in their own output format), and the last returns
``head output + cached residual`` per stream (None where the block returns None: SD3's last block has no
text stream). Mixed (CFG per half): the remaining blocks run on the computing half's rows (batch
arguments sliced) and return stand-ins (fresh views of their full-batch input); any later argument that
is a stand-in, a HunyuanDiT long skip included, is swapped for the real half-batch tensor it stands for;
the last block joins the computed half and the other half's cached result.

Steps: consecutive transformer calls with the same timestep are branches of one step (sequential CFG,
e.g. FLUX's true CFG); each branch keeps its own groups. The state resets (a new call in the stats)
at ``set_timesteps``, ``reset``/``cache_session``, and when a call's tensor shapes/dtypes change or its
timestep rises above the previous step's (a new sampling loop on a bare transformer).
"""

from __future__ import annotations

import collections
import functools
import inspect
import math
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from dit_kernels.cache.config import CacheConfig
from dit_kernels.cache.policy import CallStats, Decision, Group, Streams, decide, summary, warn_if_never_hit
from dit_kernels.parallel.shards import sum_over_shards
from dit_kernels.patching import BlockLayout, Patcher

KEEP_CALLS = 64  # calls kept in the stats


def validate(transformer: nn.Module, layout: BlockLayout, config: CacheConfig) -> None:
    """ValueError when the cache cannot wrap ``transformer`` (blocks as in ``layout``, its family's) with
    ``config`` (before anything changes)."""
    blocks = layout.blocks(transformer)
    if config.head_blocks >= len(blocks):
        raise ValueError(f"CacheConfig.head_blocks={config.head_blocks} leaves no block to cache: "
                         f"{type(transformer).__name__} has {len(blocks)} blocks")  # fmt: skip
    if layout.relayout is not None and config.cfg == "per_half":
        raise ValueError(f"CacheConfig(cfg='per_half') runs the remaining blocks on half the batch, which "
                         f"{type(transformer).__name__} does not allow (it reshapes the residual stream between "
                         "its blocks); use cfg='joint'")  # fmt: skip


class StepCache:
    """The cache's state for one patched transformer, whose blocks are as ``layout`` (its family's) says
    (see the module docstring)."""

    def __init__(self, transformer: nn.Module, layout: BlockLayout, config: CacheConfig):
        self.config = config
        self.layout = layout
        self.blocks = self.layout.blocks(transformer)
        self.lists = self.layout.lists(transformer)
        self.calls: collections.deque[CallStats] = collections.deque(maxlen=KEEP_CALLS)
        self.run: Optional[_Run] = None
        self.num_steps: Optional[int] = None
        self._pipe: Optional[weakref.ref] = None
        self.warned = False
        self.transformer = weakref.ref(transformer)  # its parallel config, read at each decision
        self._clear()

    # ------------------------------------------------------------------------------------- state

    def _clear(self) -> None:
        self.branches: dict[int, list[Group]] = {}
        self.key: Optional[tuple] = None
        self.timestep: Optional[float] = None
        self.step, self.branch = -1, 0
        self.current: Optional[CallStats] = None

    def reset(self, num_steps: Optional[int] = None) -> None:
        """Forget every reference and cached residual; the next transformer call is step 0 of a new call
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
        return _Run(self, self.step, self.branch)

    # ------------------------------------------------------------------------------------- wrappers

    def attach(self, transformer: nn.Module, patcher: Patcher, scheduler=None, pipe=None) -> None:
        """Wrap the blocks, the transformer and (given) the scheduler's set_timesteps / set_begin_index
        through ``patcher``; ``pipe``: the pipeline, whose scheduler of the moment gives the step count on
        an automatic reset (a scheduler swapped in after ``patch`` has no hook)."""
        self._pipe = None if pipe is None else weakref.ref(pipe)
        head = self.config.head_blocks
        for index, block in enumerate(self.blocks):
            role = "head, always computed" if index < head else "cached"
            patcher.set_attr(block, "forward", self._block_forward(index, block), f"step cache ({role})")
        patcher.set_attr(transformer, "forward", self._transformer_forward(transformer), "step cache: opens a step")
        if scheduler is not None:
            patcher.set_attr(scheduler, "set_timesteps", self._set_timesteps(scheduler),
                             "step cache: resets at each pipeline call")  # fmt: skip
        if scheduler is not None and hasattr(scheduler, "set_begin_index"):
            patcher.set_attr(scheduler, "set_begin_index", self._set_begin_index(scheduler),
                             "step cache: steps left after an img2img start")  # fmt: skip

    def describe(self, pipeline: bool) -> list[str]:
        """The report's cache lines (``pipeline``: the scheduler hook is on)."""
        n, head = len(self.blocks), self.config.head_blocks
        calls = "at each pipeline call (scheduler.set_timesteps), " if pipeline else (
            "(bare transformer: no step count, so no final-steps rule, unless cache_session(num_steps=...)) ")
        return [repr(self.config), f"{head} of {n} blocks ({' + '.join(self.layout.block_lists)}) always computed, "
                f"{n - head} cached", f"state resets {calls}on new shapes/dtypes/batch or a rising timestep, and by "
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
            self.run = self._begin(_named(params, args, kwargs))
            try:
                return original(*args, **kwargs)
            finally:
                self.run = None

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
    """One transformer call: the head input, the decision per group, the stand-ins of a half-batch run."""

    def __init__(self, cache: StepCache, step: int, branch: int):
        self.cache, self.layout, self.step, self.branch = cache, cache.layout, step, branch
        self.head_in: Optional[Tensor] = None
        self.rest_in: Streams = ()
        self.groups: list[Group] = []
        self.computing: list[bool] = []
        self.real: dict[int, Tensor] = {}  # id(stand-in) -> the half-batch tensor it stands for

    def block(self, index: int, original: Callable, params: list[str], args: tuple, kwargs: dict):
        cache = self.cache
        if index < cache.config.head_blocks:
            if index == 0:
                self.head_in = _named(params, args, kwargs)["hidden_states"]
            return original(*args, **kwargs)
        named = _named(params, args, kwargs)
        if index == cache.config.head_blocks:
            self.rest_in = tuple(named.get(name) for name in self.layout.streams)
            self._decide()
        last = index == len(cache.blocks) - 1
        if all(self.computing):
            out = original(*args, **kwargs)
            if last:
                self._store_all(self.layout.streams_of(out))
            return out
        if not any(self.computing):
            streams = self._replayed() if last else tuple(named.get(name) for name in self.layout.streams)
            return self.layout.output(streams)
        rows = self.groups[self.computing.index(True)].rows
        sub_args = [self._rows(name, value, rows) for name, value in zip(params, args)]
        out = original(*sub_args, **{name: self._rows(name, value, rows) for name, value in kwargs.items()})
        streams = self.layout.streams_of(out)
        return self.layout.output(self._joined(streams) if last else self._stand_ins(named, streams))

    def _decide(self) -> None:
        cache, config = self.cache, self.cache.config
        head = self.rest_in[0] - self._moved(self.head_in, 0, config.head_blocks, self.rest_in[0])
        self.batch = head.shape[0]
        self.groups = cache.groups(self.branch, self.batch)
        reduce = sum_over_shards(cache.transformer())  # context parallelism: every rank decides the same
        decisions: list[Decision] = [decide(config, g, head[g.rows], self.step, cache.num_steps, reduce)
                                     for g in self.groups]  # fmt: skip
        self.computing = [d.compute for d in decisions]
        call, rest = cache._call(), len(cache.blocks) - config.head_blocks
        for group, decision in zip(self.groups, decisions):
            call.record(self.step, self.branch, group, decision, config.head_blocks, rest)
        if not cache.warned:
            cache.warned = warn_if_never_hit(config, call)

    def _moved(self, t: Tensor, source: int, target: int, like: Tensor) -> Tensor:
        """``t``, taken at block ``source``, in the layout of block ``target`` (``BlockLayout.relayout``)."""
        lists, relayout = self.cache.lists, self.layout.relayout
        if relayout is None or lists[source] == lists[target]:
            return t
        return relayout(t, lists[source], lists[target], like)

    def _at_last(self, rest_in: Tensor, like: Tensor) -> Tensor:
        """A stream of the remaining blocks' input in the last block's layout."""
        return self._moved(rest_in, self.cache.config.head_blocks, len(self.cache.blocks) - 1, like)

    def _store_all(self, out: Streams) -> None:
        residual = [None if o is None else o - self._at_last(i, o) for o, i in zip(out, self.rest_in)]
        for group in self.groups:
            group.store(tuple(None if r is None else r[group.rows] for r in residual), self.step,
                        self.cache.config.fit_steps)  # fmt: skip

    def _skipped(self, group: Group) -> Streams:
        """A skipped group's rows of the last block's output: head output + cached residual per stream."""
        cached = group.cached()
        return tuple(None if r is None else self._at_last(i, r)[group.rows] + r
                     for i, r in zip(self.rest_in, cached))  # fmt: skip

    def _replayed(self) -> Streams:
        parts = [self._skipped(group) for group in self.groups]
        return parts[0] if len(parts) == 1 else tuple(_cat(p) for p in zip(*parts))

    def _joined(self, computed: Streams) -> Streams:
        """The last block's output when one half computed (``computed``, its rows) and the other skipped;
        records the computing half's residual."""
        parts = []
        for group, computing in zip(self.groups, self.computing):
            if computing:
                residual = tuple(None if o is None else o - i[group.rows] for o, i in zip(computed, self.rest_in))
                group.store(residual, self.step, self.cache.config.fit_steps)
                parts.append(computed)
            else:
                parts.append(self._skipped(group))
        return tuple(_cat(p) for p in zip(*parts))

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


def _cat(parts: tuple[Optional[Tensor], ...]) -> Optional[Tensor]:
    return None if parts[0] is None else torch.cat(parts)


def _parameter_names(module: nn.Module) -> list[str]:
    """The names of ``type(module).forward``'s positional parameters after ``self``."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    return [p.name for p in params if p.kind in kinds]


def _named(params: list[str], args: tuple, kwargs: dict) -> dict:
    return {**dict(zip(params, args)), **kwargs}
