"""The skip rule and its bookkeeping: one ``Group`` per CFG group (the whole batch, or one half) and
branch, one ``CallStats`` per pipeline call.

The rule predicts a skipped step's transformer output by extrapolation and keeps the extrapolation's
error near ``threshold``, as an ODE solver controls its step size. Per step ``s`` of a call of
``num_steps`` (None: unknown), for a group:

- the nodes are the group's last ``fit_steps`` computed steps ``t_0 < .. < t_m`` with their outputs
  ``y_i``; a skipped step's output is ``sum_i w_i y_i``, ``w_i`` the weights of the polynomial of degree
  ``order`` fit to the nodes (least squares; through them when there are ``order + 1``) evaluated at ``s``
  (``fit_weights``);
- on a computed step, once the group has ``order + 1`` nodes, the same prediction is checked against the
  real output: ``miss = mean|sum_i w_i y_i - y| / mean|y|`` (fp32), an error measured ``d`` steps from
  the newest node. The extrapolation's error grows about in proportion to ``d``, so the group's planned
  skip-run length (the interval between computed steps, a float kept across runs) is scaled by
  ``threshold / miss``, within [1, ``max_consecutive_skips`` + 1]: the next ``floor(interval) - 1`` steps
  skip;
- forced to compute: a step before ``warmup_steps``, one of the last ``final_steps_computed``, and every
  step until a miss has been measured; ``threshold`` 0 plans no skip, so the output is the uncached one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from dit_kernels.cache.config import CacheConfig

log = logging.getLogger("dit_kernels")

WARN_AFTER = 10  # steps the rule itself decided, without a skip, before the warning


@dataclass
class Node:
    """A computed step: its index and the group's rows of the transformer's output (a copy)."""

    step: int
    output: Tensor


@dataclass
class Group:
    """One group's state within a call: the computed steps the predictions are made from, the plan."""

    label: str
    rows: slice
    nodes: list[Node] = field(default_factory=list)  # the last ``fit_steps`` computed steps, oldest first
    interval: float = 1.0  # planned steps from one computed step to the next (1: no skip)
    next_compute: int = 0  # the step the plan computes next
    measured: bool = False  # a miss has been measured (the plan is the rule's)

    def predicted(self, step: int, order: int) -> Tensor:
        """The output at ``step`` predicted from the nodes: a new tensor in their dtype, computed in fp32."""
        weights = fit_weights([n.step for n in self.nodes], step, order)
        outputs = [n.output for n in self.nodes]
        return combine([o.float() for o in outputs], weights).to(outputs[-1].dtype)

    def computed(self, config: CacheConfig, step: int, output: Tensor) -> Optional[float]:
        """Step ``step`` computed ``output`` (the group's rows): measure the prediction's miss (None before
        ``order + 1`` nodes), re-plan, keep the output as the newest node. Returns the miss."""
        miss = None
        if len(self.nodes) >= config.order + 1:
            miss = relative_l1(self.predicted(step, config.order), output)
            ratio = 0.0 if config.threshold == 0 else math.inf if miss == 0 else config.threshold / miss
            self.interval = min(max(self.interval * ratio, 1.0), config.max_consecutive_skips + 1.0)
            self.next_compute, self.measured = step + int(self.interval), True
        else:
            self.next_compute = step + 1
        self.nodes = [*self.nodes, Node(step, output.detach().clone())][-config.fit_steps:]
        return miss


def fit_weights(nodes: list[int], step: int, order: int) -> list[float]:
    """Weights ``w_i`` with ``p(step) = sum_i w_i f(nodes[i])`` for the polynomial ``p`` of degree
    ``min(order, len(nodes) - 1)`` fit to ``(nodes[i], f(nodes[i]))`` by least squares: through the points
    when there are ``degree + 1`` of them (Newton's divided differences on uneven steps: one node reuses it,
    two extrapolate linearly), a smoothing fit when there are more. ``w = v(step)^T pinv(V)``, ``V`` the
    Vandermonde matrix of the nodes (centred on the newest, fp64)."""
    degree = min(order, len(nodes) - 1)
    if degree == 0 and len(nodes) == 1:
        return [1.0]
    t = torch.tensor(nodes, dtype=torch.float64) - nodes[-1]
    vandermonde = torch.stack([t**p for p in range(degree + 1)], dim=1)
    at = torch.tensor([float(step - nodes[-1]) ** p for p in range(degree + 1)], dtype=torch.float64)
    return (at @ torch.linalg.pinv(vandermonde)).tolist()


def combine(values: list[Tensor], weights: list[float]) -> Tensor:
    """``sum_i weights[i] * values[i]``, a new tensor."""
    out = values[-1] * weights[-1]
    for value, w in zip(values[:-1], weights[:-1]):
        out = out.add(value, alpha=w)
    return out


def relative_l1(x: Tensor, reference: Tensor) -> float:
    """``mean|x - reference| / mean|reference|`` in fp32 (inf when the reference is all zeros); both means
    come to the host in one small read."""
    x, reference = x.float(), reference.float()
    difference, scale = torch.stack([(x - reference).abs().mean(), reference.abs().mean()]).tolist()
    return math.inf if scale == 0 else difference / scale


@dataclass(frozen=True)
class Decision:
    compute: bool
    reason: str


def decide(config: CacheConfig, group: Group, step: int, num_steps: Optional[int]) -> Decision:
    """Compute or skip ``group`` at ``step``, before the transformer runs: the forcing rules, then the plan."""
    if step < config.warmup_steps:
        return Decision(True, "warm-up")
    if num_steps is not None and step >= num_steps - config.final_steps_computed:
        return Decision(True, "final steps")
    if step < group.next_compute:
        return Decision(False, "planned skip")
    return Decision(True, "planned" if group.measured else "no estimate")


@dataclass
class CallStats:
    """One pipeline call (or the transformer calls between two resets)."""

    num_steps: Optional[int]
    steps: int = 0
    blocks_computed: int = 0
    blocks_skipped: int = 0
    bypassed_calls: int = 0  # transformer calls run uncached (ControlNet, skip layers)
    trace: list[dict] = field(default_factory=list)

    def record(self, step: int, branch: int, group: Group, decision: Decision, blocks: int) -> dict:
        """One group's decision at one step (``blocks``: the transformer's); returns its trace entry, whose
        ``miss`` a computed step fills in afterwards."""
        self.blocks_computed += blocks * decision.compute
        self.blocks_skipped += blocks * (not decision.compute)
        entry = {"step": step, "branch": branch, "group": group.label, "decision": "compute" if decision.compute
                 else "skip", "reason": decision.reason, "interval": group.interval, "miss": None}  # fmt: skip
        self.trace.append(entry)
        return entry

    @property
    def hits(self) -> int:
        return sum(entry["decision"] == "skip" for entry in self.trace)

    @property
    def eligible(self) -> int:
        """Decisions the plan made (not forced by warm-up, final steps or a missing estimate)."""
        return sum(entry["reason"] in ("planned", "planned skip") for entry in self.trace)

    def as_dict(self) -> dict:
        """``blocks_*`` count block evaluations per group (per_half counts each half's)."""
        return {"num_steps": self.num_steps, "steps": self.steps, "blocks_computed": self.blocks_computed,
                "blocks_skipped": self.blocks_skipped, "hit_rate": self.hits / max(1, len(self.trace)),
                "bypassed_calls": self.bypassed_calls, "trace": list(self.trace)}  # fmt: skip


def summary(config: CacheConfig, calls: list[CallStats]) -> dict:
    """``dit_kernels.cache_stats``: the totals over the calls kept, and each call (oldest first)."""
    decisions = sum(len(c.trace) for c in calls)
    return {
        "config": config,
        "steps": sum(c.steps for c in calls),
        "blocks_computed": sum(c.blocks_computed for c in calls),
        "blocks_skipped": sum(c.blocks_skipped for c in calls),
        "hit_rate": sum(c.hits for c in calls) / max(1, decisions),
        "calls": [c.as_dict() for c in calls],
    }


def warn_if_never_hit(config: CacheConfig, call: CallStats) -> bool:
    """Log once (the caller keeps the flag) when the plan decided WARN_AFTER steps of a call, none a skip."""
    if config.threshold > 0 and call.eligible >= WARN_AFTER and call.hits == 0:
        log.warning("dit_kernels step cache: 0 %% hit rate after %d planned steps at threshold %g: the "
                    "extrapolated output misses by more than the threshold one step ahead, so the cache "
                    "computes every step (trace: dit_kernels.cache_stats(...)['calls'][-1]['trace']); raise "
                    "the threshold", call.eligible, config.threshold)  # fmt: skip
        return True
    return False
