"""The study report's ablations: per ablation one table (each method's mean ± std over the seeds at every
variant, then every other method's paired difference with the first) and one plot."""

from __future__ import annotations

from pathlib import Path

from ..compare import mean_std
from .metric import Metric
from .plots import plot_ablation
from .runner import ablation_values, task_metric
from .section import interval, rel, table
from .spec import Ablation, Study
from .stats import ALPHA, POWER, detectable_at_median, paired


def ablation_section(study: Study, out: Path, a: Ablation, img: Path) -> list[str]:
    """The ablation's Markdown lines; its plot goes to ``img``."""
    values, metric = ablation_values(study, out, a), task_metric(study, a.task)
    name = f"ablation_{a.name}.png"
    plot_ablation([v.label for v in a.variants], values, a.x_label, a.title, img / name, f"final test {metric.label}")
    first, others = a.methods[0], a.methods[1:]
    rows = [(a.x_label, *(f"`{m}` {metric.label} mean ± std" for m in a.methods),
             *(f"`{m}` − `{first}`: mean [95% CI]" for m in others), "settings")]
    spreads_of_differences = []
    for i, v in enumerate(a.variants):
        spreads = (mean_std(values[m][i]) for m in a.methods)
        # seed by seed: within a seed both methods had the same split, budgets and held-out set
        diffs = [paired(values[m][i], values[first][i], metric.higher_is_better) for m in others]
        spreads_of_differences += [d.std for d in diffs]
        rows.append((v.label, *(f"{mean:.3f} ± {std:.3f}" for mean, std in spreads), *map(interval, diffs),
                     "`" + " ".join(v.overrides) + "`"))
    methods = ", ".join(f"`{m}`" for m in a.methods)
    return [f"### {a.title} ({methods}; task `{a.task}`)", "", *table(rows), "",
            *([_differences(study, metric, first, spreads_of_differences), ""] if others else []),
            *([a.note, ""] if a.note else []), f"![{a.name}]({rel(img)}/{name})", ""]


def _differences(study: Study, metric: Metric, first: str, stds: list[float]) -> str:
    """What the difference columns hold, which sign is better, and the smallest true difference the
    seeds detect at the median spread of the paired differences (``stds``)."""
    n = len(study.seeds)
    spread = f", with the 95% t interval of their mean over the {n} seeds" if n > 1 else " (one seed: no interval)"
    better, sign = ("higher", "positive") if metric.higher_is_better else ("lower", "negative")
    line = (f"Differences: method − `{first}`, paired seed by seed{spread}; {better} {metric.label} is better, "
            f"so a {sign} difference means the method did better than `{first}`.")
    if n > 1:
        sd, mdd = detectable_at_median(stds, n)
        line += (f" Power: at the median spread of these paired differences ({sd:.3f}), a two-sided paired t test "
                 f"at α = {ALPHA} detects a true difference of {mdd:.3f} with probability "
                 f"{POWER:.0%} (one variant at a time, no correction over the variants).")
    return line
