"""What every task section of the study report shares, whatever the task is scored by: the paired
comparison of the reference method with every other (t intervals, Holm-adjusted verdicts), what the
design can detect, whether the runs were long enough, the check that the methods saw the same
clients, and Markdown tables."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..compare import mean_std, run_dir
from ..errors import ConfigError
from ..strategies import METHODS
from .metric import ACCURACY, Metric
from .runner import MethodResult, task_dir, task_results
from .spec import Study
from .stats import ALPHA, POWER, Paired, detectable_at_median, holm, late_gain, paired, verdict

TOTAL = "total MB (up + down) / client / round"  # download is a cost too (FLoRA, Fed-PLoRA, the folds pay there)


@dataclass(frozen=True)
class TaskRuns:
    """What a task's section reads: its run directories and every method's and reference line's results."""

    folder: Path
    results: list[MethodResult]
    refs: list[MethodResult]  # the reference lines (centralised, local), if the study has them
    ours: MethodResult  # the study's reference method
    runs: dict[str, list[Path]]  # method -> its run directory per seed


def task_runs(study: Study, out: Path, task: str) -> TaskRuns:
    d = task_dir(out, task)
    results = task_results(study, out, task)
    refs = task_results(study, out, task, study.references) if study.references else []
    return TaskRuns(d, results, refs, next(r for r in results if r.method == study.reference),
                    {m: [run_dir(d, m, s) for s in study.seeds] for m in study.methods})


@dataclass(frozen=True)
class Comparison:
    """The reference method against every other on one metric, paired over seeds."""

    metric: Metric
    reference: str
    pairs: dict[str, Paired]  # every other method: reference - method
    adjusted: dict[str, float]  # Holm-adjusted p of the methods that respect the budgets (the rivals)

    def cell(self, method: str, with_verdict: bool = True) -> str:
        """The table cell: mean [95% CI], and the Holm p and verdict (a budget-breaking method gets none)."""
        p, adj = self.pairs[method], self.adjusted.get(method)
        if not with_verdict:
            return interval(p)
        return interval(p) + (f", p = {adj:.3f}" if adj is not None else "") + f" → {self.word(method)}"

    def word(self, method: str) -> str:
        adj = self.adjusted.get(method)
        if adj is None:
            return "reference, no verdict"
        return verdict(self.pairs[method], adj, self.metric.tie, self.metric.higher_is_better)

    def verdict_line(self, task: str, method: str, seeds: int) -> str | None:
        """The summary's line on ``method`` (None for a budget-breaking one)."""
        if method not in self.adjusted:
            return None
        p, what = self.pairs[method], "" if self.metric == ACCURACY else f" ({self.metric.label})"
        return (f"`{task}` vs `{method}`{what}: **{self.word(method)}** ({interval(p)}; `{self.reference}` ahead "
                f"on {p.won}, behind on {p.lost} of {seeds} seeds)")


def compare_with_reference(study: Study, results: list[MethodResult], metric: Metric,
                           values: Callable[[MethodResult], list[float]]) -> Comparison:
    """The reference's ``values`` minus every other method's, seed by seed; Holm over the rivals."""
    ours = next(r for r in results if r.method == study.reference)
    pairs = {r.method: paired(values(ours), values(r), metric.higher_is_better) for r in results if r is not ours}
    rivals = [m for m in pairs if METHODS[m].respects_budgets]
    return Comparison(metric, study.reference, pairs, dict(zip(rivals, holm([pairs[m].p for m in rivals]))))


def interval(p: Paired) -> str:
    lo, hi = p.interval
    return f"{p.mean:+.3f}" + ("" if math.isinf(p.half_width) else f" [{lo:+.3f}, {hi:+.3f}]")


def reference_note(ref: MethodResult, ours: MethodResult) -> str:
    gap = ours.mean - ref.mean
    return f"{ours.method} {'+' if gap >= 0 else '−'}{abs(gap):.3f} vs this line (not a competitor)"


def detectable(study: Study, cmp: Comparison) -> tuple[float, float] | None:
    """(median spread of the rivals' paired differences, the smallest true difference a paired t test
    over the seeds detects with probability POWER at that spread); None for one seed or no rival."""
    if len(study.seeds) < 2 or not cmp.adjusted:
        return None
    return detectable_at_median([cmp.pairs[m].std for m in cmp.adjusted], len(study.seeds))


def power(study: Study, cmp: Comparison) -> str:
    """The smallest true difference the seeds detect, from the spread of the paired differences."""
    found = detectable(study, cmp)
    if found is None:
        return "**Power:** one seed cannot tell any two methods apart; add seeds for verdicts."
    (sd, mdd), n, rivals = found, len(study.seeds), list(cmp.adjusted)
    what = "" if cmp.metric == ACCURACY else f"{cmp.metric.label} "
    return (f"**Power:** paired over {n} seeds, with the median spread of the paired differences here ({sd:.3f}), "
            f"a two-sided paired t test at α = {ALPHA} detects a true {what}difference of **{mdd:.3f}** with "
            f"probability {POWER:.0%}; smaller real differences will mostly read as inconclusive. Verdicts are "
            f"Holm-adjusted over the {len(rivals)} comparisons, so the chance of any false win or loss here "
            f"is at most {ALPHA}.")


def flattening(results: list[MethodResult], curves: dict, metric: Metric) -> str:
    """Whether the best method's mean curve (``curves``: method -> per seed (round, MB, value)) has
    flattened over the last third of the rounds."""
    best = max(results, key=lambda r: metric.sign * r.mean)
    cs = curves[best.method]
    mean_curve = [(cs[0][i][0], statistics.fmean(c[i][2] for c in cs)) for i in range(min(len(c) for c in cs))]
    gain = late_gain(mean_curve)
    spread = mean_std([c[-1][2] for c in cs])[1] / math.sqrt(len(cs))  # standard error of its final mean
    flat = metric.sign * gain <= max(2 * spread, metric.tie)
    moved = f"gained {gain:+.3f} accuracy" if metric == ACCURACY else f"changed its {metric.label} by {gain:+.3f}"
    return (f"**Run length:** the best method here, `{best.method}`, {moved} over the last third "
            f"of the rounds (mean over seeds; its seeds' standard error is {spread:.3f}): "
            + ("its curve has flattened (the gain is within two standard errors)." if flat else
               "its curve is **still rising**, so longer runs could reorder the methods." if metric.higher_is_better
               else "its curve is **still falling**, so longer runs could reorder the methods."))


def same_clients(study: Study, out: Path, task: str) -> str:
    """Check, from each run's clients.json, that all methods of a seed had the same split and
    budgets; say so in the report (a mismatch is an error, never a table)."""
    for seed in study.seeds:
        seen = {m: json.loads((run_dir(task_dir(out, task), m, seed) / "clients.json").read_text())
                for m in study.methods}
        first = study.methods[0]
        odd = [m for m in study.methods if seen[m] != seen[first]]
        if odd:
            raise ConfigError(f"task {task}, seed {seed}: {odd[0]} ran on another split or budgets than {first} "
                              f"(compare their clients.json in {task_dir(out, task)})")
    return (f"Checked from the runs: within each seed, every method had the same client split and budgets "
            f"({len(study.methods)} identical `clients.json` per seed).")


def table(rows: list[tuple[str, ...]]) -> list[str]:
    head, *body = rows
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]


def rel(img: Path) -> str:
    """The image folder as the report links it (relative to the report's folder)."""
    return img.relative_to(img.parent.parent).as_posix()
