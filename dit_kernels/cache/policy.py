"""The skip rule and its bookkeeping: one ``Group`` per CFG group (the whole batch, or one half) and
branch, one ``CallStats`` per pipeline call.

Per step ``s`` of a call of ``num_steps`` (None: unknown), for a group whose head residual is ``r``:

- ``change = mean|r - r_prev| / mean|r_prev|`` (fp32; ``r_prev`` from the previous step, computed or
  not), ``accumulated`` = the sum of the changes since the group's last computed step;
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
class Group:
    """One group's state within a call: what the next step is compared with and what it reuses."""

    label: str
    rows: slice
    reference: Optional[Tensor] = None  # head residual of the previous step
    accumulated: float = 0.0
    skips: int = 0  # consecutive
    residuals: Optional[Streams] = None  # remaining blocks' residual per stream at the last computed step
    computed_at: Optional[int] = None
    before: Optional[tuple[Streams, int]] = None  # the computed step before that (extrapolation)

    def store(self, residuals: Streams, step: int, extrapolate: bool) -> None:
        if extrapolate and self.residuals is not None:
            self.before = (self.residuals, self.computed_at)
        self.residuals, self.computed_at = residuals, step

    def cached(self, step: int, extrapolate: bool) -> Streams:
        """The residuals to add at a skipped ``step``: the last computed ones, or their first-order
        extrapolation from the last two computed steps."""
        if not (extrapolate and self.before is not None):
            return self.residuals
        older, at = self.before
        slope = (step - self.computed_at) / (self.computed_at - at)
        return tuple(None if r is None else r + (r - o) * slope for r, o in zip(self.residuals, older))


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
    (rows of this group only); updates the group's reference, accumulator and skip count. ``reduce``: see
    ``relative_l1``."""
    change = None if group.reference is None else relative_l1(head, group.reference, reduce)
    accumulated = group.accumulated + (change or 0.0)
    group.reference = head
    if step < config.warmup_steps:
        reason = "warm-up"
    elif num_steps is not None and step >= num_steps - config.final_steps_computed:
        reason = "final steps"
    elif change is None or group.residuals is None:
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
