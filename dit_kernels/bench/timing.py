"""Timing a user can trust: interleaved rounds, the spread of every path, paired ratios with an interval,
the machine's load, and warnings where the noise makes a figure meaningless.

``measure(paths, ...)`` runs every path once per round (the order rotated each round, so no path always
runs first or after the same neighbour) until both ``min_repeats`` rounds are done and ``budget_s`` seconds
have passed (or exactly ``repeats`` rounds); warm-up is the caller's. Per path: the samples (ms per run),
their median and interquartile range (IQR). A ratio ``base / path`` is the median of the per-round ratios
(rounds are interleaved, so each pair shared the machine's state), with a distribution-free interval for
that median: the order statistics ``r_(k) .. r_(n+1-k)`` of the ``n`` sorted ratios for the largest ``k`` with
``P(Binomial(n, 1/2) < k) <= 2.5 %`` (coverage >= 95 %); below 6 rounds no such ``k`` exists and the
interval is min .. max (coverage ``1 - 2^(1-n)``, stated).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional

import torch

MIN_REPEATS = 5  # rounds at least: enough for a min..max interval of 94 % coverage
BUDGET_S = 10.0  # and rounds until this many seconds of timed runs: short runs get many
MAX_REPEATS = 100
NOISY_IQR = 0.10  # a path whose IQR exceeds this fraction of its median is flagged
CONFIDENCE = 0.95


def time_ms(fn: Callable[[], object], device: str = "cpu") -> float:
    """Wall time of ``fn()`` in ms (CUDA synchronized before and after on a CUDA device)."""
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


@dataclass(frozen=True)
class Load:
    """The machine while timing: 1-minute load averages before and after, CPUs, torch's intra-op threads."""

    before: float
    after: float
    cpus: int
    torch_threads: int

    @staticmethod
    def now(before: Optional[float] = None) -> "Load":
        current = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
        return Load(current if before is None else before, current, os.cpu_count() or 1, torch.get_num_threads())

    def busy(self) -> bool:
        """Other work competed for the CPUs: a load average above half the CPU count before or after."""
        return max(self.before, self.after) > self.cpus / 2

    def __str__(self) -> str:
        return f"load {self.before:.2f} -> {self.after:.2f} on {self.cpus} CPUs, torch threads {self.torch_threads}"


@dataclass(frozen=True)
class Spread:
    """One path's samples (ms): median, quartiles, extremes, IQR as a fraction of the median."""

    n: int
    median: float
    q1: float
    q3: float
    min: float
    max: float

    @staticmethod
    def of(samples: list[float]) -> "Spread":
        if len(samples) == 1:
            q1 = q3 = samples[0]
        else:
            q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        return Spread(len(samples), statistics.median(samples), q1, q3, min(samples), max(samples))

    @property
    def iqr_fraction(self) -> float:
        return (self.q3 - self.q1) / self.median if self.median > 0 else math.inf


@dataclass(frozen=True)
class Ratio:
    """``base / path`` per round: median and an interval for it, with the interval's coverage."""

    median: float
    low: float
    high: float
    coverage: float

    def overlaps_one(self) -> bool:
        return self.low <= 1.0 <= self.high


def median_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(low, high, coverage): the distribution-free interval for the median of ``values`` (module docstring)."""
    ordered, n = sorted(values), len(values)
    below = [math.comb(n, i) / 2**n for i in range(n + 1)]  # P(Binomial(n, 1/2) = i)
    k, tail = 0, 0.0
    while k < n // 2 and tail + below[k] <= (1 - confidence) / 2:
        tail += below[k]
        k += 1
    if k == 0:  # too few values for the confidence asked: min..max, whatever it covers
        return ordered[0], ordered[-1], 1 - 2 * below[0] if n > 1 else 0.0
    return ordered[k - 1], ordered[n - k], 1 - 2 * tail


@dataclass
class Timing:
    """What ``measure`` found: ``samples[label]`` in ms per run, in round order; the machine's ``load``."""

    samples: dict[str, list[float]]
    load: Load

    @property
    def rounds(self) -> int:
        return min(len(s) for s in self.samples.values())

    def spread(self, label: str) -> Spread:
        return Spread.of(self.samples[label])

    def ratio(self, base: str, label: str) -> Ratio:
        """How many times faster ``label`` ran than ``base`` (> 1: faster), per interleaved round."""
        per_round = [b / p for b, p in zip(self.samples[base], self.samples[label])]
        low, high, coverage = median_interval(per_round)
        return Ratio(statistics.median(per_round), low, high, coverage)

    def noise(self) -> float:
        """The noise level: the largest IQR of any path, as a fraction of its median."""
        return max(self.spread(label).iqr_fraction for label in self.samples)

    def warnings(self, base: str) -> list[str]:
        """Lines saying where a figure should not be trusted: a busy machine, too few rounds for a spread, a
        path's IQR above ``NOISY_IQR``, a ratio vs ``base`` whose interval contains 1."""
        found = []
        if self.load.busy():
            found.append(f"machine busy ({self.load}): other work shared the CPUs, timings are perturbed")
        if self.rounds < 2:
            found.append(f"{self.rounds} round: no spread measured, ratios are single samples")
            return found
        for label in self.samples:
            spread = self.spread(label)
            if spread.iqr_fraction > NOISY_IQR:
                found.append(f"{label}: IQR {spread.iqr_fraction:.0%} of the median (> {NOISY_IQR:.0%}): noisy")
            if label != base and (ratio := self.ratio(base, label)).overlaps_one():
                found.append(
                    f"{label}: vs {base} {ratio.median:.3g}, interval {ratio.low:.3g}-{ratio.high:.3g} contains 1: "
                    "no difference shown at this noise (more rounds, --budget, or a quieter machine)"
                )
        return found

    def describe(self) -> str:
        """One header field: rounds, how they ran, the noise level and the load."""
        return (f"repeats: {self.rounds} rounds (interleaved, warm-up excluded; median, IQR) | noise: IQR <= "
                f"{self.noise():.1%} | {self.load}")  # fmt: skip

    def as_dict(self, base: Optional[str] = None) -> dict:
        """JSON-ready: per path the samples and their spread (and the ratio vs ``base``), the load, rounds."""
        paths = {}
        for label, samples in self.samples.items():
            paths[label] = {"samples_ms": samples, "spread_ms": asdict(self.spread(label))}
            if base is not None:
                paths[label]["ratio_vs_" + base] = asdict(self.ratio(base, label))
        return {"rounds": self.rounds, "noise_iqr_fraction": self.noise(), "load": asdict(self.load), "paths": paths}


def measure(
    paths: Mapping[str, Callable[[], object]],
    *,
    repeats: Optional[int] = None,
    min_repeats: int = MIN_REPEATS,
    budget_s: float = BUDGET_S,
    max_repeats: int = MAX_REPEATS,
    device: str = "cpu",
    progress: Optional[Callable[[], object]] = None,
) -> Timing:
    """Time each of ``paths`` (label -> a no-argument run) in interleaved rounds, the order rotated each round:
    exactly ``repeats`` rounds when given, else at least ``min_repeats`` and until ``budget_s`` seconds of
    timed runs (at most ``max_repeats``). ``progress()`` after each run. Warm-up is the caller's."""
    if not paths:
        raise ValueError("measure: no paths to time")
    if repeats is not None and repeats < 1:
        raise ValueError(f"measure: repeats must be at least 1, got {repeats}")
    labels = list(paths)
    samples: dict[str, list[float]] = {label: [] for label in labels}
    load_before = Load.now().before
    spent_ms, rounds = 0.0, 0
    while _more(rounds, spent_ms / 1e3, repeats, min_repeats, budget_s, max_repeats):
        shift = rounds % len(labels)
        for label in labels[shift:] + labels[:shift]:
            ms = time_ms(paths[label], device)
            samples[label].append(ms)
            spent_ms += ms
            if progress:
                progress()
        rounds += 1
    return Timing(samples, Load.now(before=load_before))


def _more(rounds: int, spent_s: float, repeats, min_repeats: int, budget_s: float, max_repeats: int) -> bool:
    if repeats is not None:
        return rounds < repeats
    return rounds < min_repeats or (spent_s < budget_s and rounds < max_repeats)
