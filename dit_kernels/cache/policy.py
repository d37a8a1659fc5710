"""The skip rule and its bookkeeping: one ``Group`` per CFG group (the whole batch, or one half) and
branch, one ``CallStats`` per pipeline call.

Per step ``s`` of a call of ``num_steps`` (None: unknown), for a group whose head residual is ``h``:

- the group's nodes are its last ``fit_steps`` computed steps ``t_0 < .. < t_m``, each with its head
  residual ``h_i`` and the remaining blocks' residual ``R_i`` per stream; ``w_i`` are the weights of the
  polynomial of degree ``order`` fit to them (least squares; through them when there are ``order + 1``),
  evaluated at ``s`` (``fit_weights``);
- ``change = mean|sum_i w_i h_i - h| / mean|h|`` (fp32): how far the prediction misses the head residual,
  which was computed; the same prediction of the remaining blocks' residual, ``sum_i w_i R_i``, is what a
  skipped step adds. ``accumulated`` = the sum of the changes over the skipped steps since the group's
  last computed step and this one (an error budget per skip run: runs are long while the prediction
  holds, short where it does not);
- computed (in this order of reasons): a step before ``warmup_steps``, one of the last
  ``final_steps_computed``, no reference yet, after ``max_consecutive_skips`` skips, ``change >=
  threshold``, ``accumulated >= threshold``; otherwise skipped (a cache hit). A computed step clears
  the accumulator and the skip count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from dit_kernels.cache.config import CacheConfig

log = logging.getLogger("dit_kernels")

Streams = tuple[Optional[Tensor], ...]

# Decisions that the threshold made (the others were forced by a rule); the 0 % hit warning counts these.
THRESHOLD_REASONS = ("change >= threshold", "accumulated >= threshold", "below threshold")
WARN_AFTER = 10  # eligible steps without a hit before the warning


@dataclass
class Node:
    """A computed step: its index, its head residual and the remaining blocks' residual per stream."""

    step: int
    head: Tensor
    residuals: Streams


@dataclass
class Group:
    """One group's state within a call: the computed steps the predictions are made from, the skip run."""

    label: str
    rows: slice
    nodes: list[Node] = field(default_factory=list)  # the last ``fit_steps`` computed steps, oldest first
    head: Optional[Tensor] = None  # this step's head residual (a node's, if the step computes)
    weights: list[float] = field(default_factory=list)  # this step's prediction weights, one per node
    accumulated: float = 0.0
    skips: int = 0  # consecutive

    def store(self, residuals: Streams, step: int, keep: int) -> None:
        """Step ``step`` computed: keep it (with this step's head residual) as the newest of ``keep`` nodes."""
        self.nodes = [*self.nodes, Node(step, self.head, residuals)][-keep:]

    def cached(self) -> Streams:
        """The remaining blocks' residual per stream predicted at this step (``weights``, see ``fit_weights``)."""
        return tuple(None if node_r[0] is None else combine(node_r, self.weights)
                     for node_r in zip(*(n.residuals for n in self.nodes)))  # fmt: skip


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


def combine(values: tuple[Tensor, ...], weights: list[float]) -> Tensor:
    """``sum_i weights[i] * values[i]`` (the newest value alone when it is one node: no arithmetic)."""
    if len(values) == 1:
        return values[0]
    out = values[-1] * weights[-1]
    for value, w in zip(values[:-1], weights[:-1]):
        out = out.add(value, alpha=w)
    return out


@dataclass(frozen=True)
class Decision:
    compute: bool
    reason: str
    change: Optional[float]
    accumulated: float


def relative_l1(x: Tensor, reference: Tensor, reduce: Optional[Callable[[Tensor], Tensor]] = None) -> float:
    """``mean|x - reference| / mean|reference|`` in fp32 (inf when the reference is all zeros); both means
    come to the host in one small read. ``reduce``: given, the two means [2] go through it first; under
    context parallelism it sums them over the ranks holding the other (equal) shards of the sequence, which
    makes the ratio the whole sequence's and the same on every rank."""
    x, reference = x.float(), reference.float()
    means = torch.stack([(x - reference).abs().mean(), reference.abs().mean()])
    difference, scale = (means if reduce is None else reduce(means)).tolist()
    return float("inf") if scale == 0 else difference / scale


def decide(config: CacheConfig, group: Group, head: Tensor, step: int, num_steps: Optional[int],
           reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Decision:  # fmt: skip
    """Compute or skip the remaining blocks for ``group`` at ``step``, given its head residual ``head``
    (rows of this group only): the change is the error of the head residual predicted from the group's
    nodes as the remaining blocks' residual would be; updates the group's weights, accumulator and skip
    count. ``reduce``: see ``relative_l1``."""
    group.head = head
    change = None
    if group.nodes:
        group.weights = fit_weights([n.step for n in group.nodes], step, config.order)
        predicted = combine(tuple(n.head for n in group.nodes), group.weights)
        change = relative_l1(predicted, head, reduce)
    accumulated = group.accumulated + (change or 0.0)
    if step < config.warmup_steps:
        reason = "warm-up"
    elif num_steps is not None and step >= num_steps - config.final_steps_computed:
        reason = "final steps"
    elif change is None:
        reason = "no reference"
    elif group.skips >= config.max_consecutive_skips:
        reason = "consecutive-skip cap"
    elif change >= config.threshold:
        reason = "change >= threshold"
    elif accumulated >= config.threshold:
        reason = "accumulated >= threshold"
    else:
        group.accumulated, group.skips = accumulated, group.skips + 1
        return Decision(False, "below threshold", change, accumulated)
    group.accumulated, group.skips = 0.0, 0
    return Decision(True, reason, change, accumulated)

@dataclass
class CallStats:
    """One pipeline call (or the transformer calls between two resets)."""

    num_steps: Optional[int]
    steps: int = 0
    blocks_computed: int = 0
    blocks_skipped: int = 0
    bypassed_calls: int = 0  # transformer calls run uncached (ControlNet, skip layers)
    trace: list[dict] = field(default_factory=list)

    def record(self, step: int, branch: int, group: Group, decision: Decision, head: int, rest: int) -> None:
        self.blocks_computed += head + rest * decision.compute
        self.blocks_skipped += rest * (not decision.compute)
        self.trace.append({"step": step, "branch": branch, "group": group.label, "change": decision.change,
                           "accumulated": decision.accumulated, "decision": "compute" if decision.compute else "skip",
                           "reason": decision.reason})  # fmt: skip

    @property
    def hits(self) -> int:
        return sum(entry["decision"] == "skip" for entry in self.trace)

    @property
    def eligible(self) -> int:
        """Decisions the threshold made (not forced by warm-up, final steps, the cap, a missing reference)."""
        return sum(entry["reason"] in THRESHOLD_REASONS for entry in self.trace)

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
    """Log once (the caller keeps the flag) when a call made WARN_AFTER threshold decisions, none a hit."""
    if config.threshold > 0 and call.eligible >= WARN_AFTER and call.hits == 0:
        log.warning("dit_kernels step cache: 0 %% hit rate after %d eligible steps at threshold %g: the cache "
                    "computes every step (trace: dit_kernels.cache_stats(...)['calls'][-1]['trace']); raise the "
                    "threshold or lower head_blocks", call.eligible, config.threshold)  # fmt: skip
        return True
    return False
