"""The statistics a study's verdicts rest on: paired differences over seeds with t intervals,
Holm's correction across the comparisons of one task, the smallest difference the design can
detect, accuracy at equal upload, and whether a curve has flattened.

Differences are always ours minus theirs; ``higher_is_better`` says which sign is ahead
(True for accuracy and Rouge-L, False for a loss).

Seeds pair the runs: within a seed every method had the same split, budgets, held-out
sample and initial adapter, so the paired difference removes the variation they share.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

ALPHA = 0.05  # two-sided level of every interval and test
POWER = 0.8  # for the smallest detectable difference


@dataclass(frozen=True)
class Paired:
    mean: float  # mean over seeds of (ours - theirs)
    std: float  # sample standard deviation of the paired differences
    half_width: float  # of the two-sided (1 - ALPHA) t interval of the mean (inf for one seed)
    p: float  # two-sided paired t test of "no difference" (1.0 when it cannot be computed)
    won: int  # seeds where ours is ahead (larger, or smaller for a lower-is-better metric)
    lost: int

    @property
    def interval(self) -> tuple[float, float]:
        return self.mean - self.half_width, self.mean + self.half_width


def paired(ours: Sequence[float], theirs: Sequence[float], higher_is_better: bool = True) -> Paired:
    diffs = [a - b for a, b in zip(ours, theirs)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if n > 1 else 0.0
    ahead, behind = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    won, lost = (ahead, behind) if higher_is_better else (behind, ahead)
    if n < 2:
        return Paired(mean, std, math.inf, 1.0, won, lost)
    se = std / math.sqrt(n)
    half = stats.t.ppf(1 - ALPHA / 2, n - 1) * se
    if se == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    return Paired(mean, std, float(half), p, won, lost)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given): controls the chance of any
    false "win" or "loss" among the comparisons at ALPHA."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def verdict(p: Paired, adjusted_p: float, tie: float, higher_is_better: bool = True) -> str:
    """win / loss: the adjusted test rejects "no difference" at ALPHA; tie: the whole interval
    lies within ±tie; otherwise inconclusive (the design cannot tell)."""
    ahead = p.mean > 0 if higher_is_better else p.mean < 0
    if math.isinf(p.half_width):
        return "one seed: ahead" if ahead else "one seed: behind"
    if adjusted_p < ALPHA:
        return "win" if ahead else "loss"
    lo, hi = p.interval
    return "tie" if -tie <= lo and hi <= tie else "inconclusive"


def mean_stderr(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error over seeds (nan for a single value: one draw has no spread)."""
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan
    return statistics.fmean(xs), se


def detectable_difference(std: float, n: int) -> float:
    """The smallest true paired difference a two-sided paired t test at ALPHA detects with
    probability POWER, for ``n`` seeds and a paired-difference spread ``std``."""
    if n < 2:
        return math.inf
    t = stats.t.ppf(1 - ALPHA / 2, n - 1) + stats.t.ppf(POWER, n - 1)
    return float(t * std / math.sqrt(n))


def detectable_at_median(stds: Sequence[float], n: int) -> tuple[float, float]:
    """(median of the paired differences' spreads ``stds``, the smallest true difference ``n`` seeds detect
    at that spread: :func:`detectable_difference`)."""
    sd = statistics.median(stds)
    return sd, detectable_difference(sd, n)


def at_upload(points: Sequence[tuple[float, float]], budget: float) -> float:
    """Accuracy when the cumulative upload reaches ``budget``: linear between the evaluations
    (``points``: (cumulative upload, accuracy), increasing upload), nan beyond the last one."""
    for (u0, a0), (u1, a1) in zip(points, points[1:]):
        if u0 <= budget <= u1:
            return a0 if u1 == u0 else a0 + (a1 - a0) * (budget - u0) / (u1 - u0)
    return points[0][1] if points and budget <= points[0][0] else math.nan


def late_gain(points: Sequence[tuple[int, float]]) -> float:
    """How much accuracy grew over the last third of the rounds (``points``: (round, accuracy)):
    the check that a run was long enough for its curve to flatten."""
    last = points[-1][0]
    start = max((p for p in points if p[0] <= last * 2 / 3), key=lambda p: p[0], default=points[0])
    return points[-1][1] - start[1]
