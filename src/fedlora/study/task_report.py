"""One task's part of the study report: the table of every method and reference line, paired
verdicts of the reference method against every other (t intervals, Holm-adjusted), accuracy
at equal upload, whether the runs were long enough, and what the design can detect."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

from ..compare import SUMMARY, mean_std, run_dir
from ..errors import ConfigError
from ..runner import eval_curve
from ..strategies import METHODS
from .plots import plot_curves
from .runner import MethodResult, task_dir, task_results
from .spec import Study
from .stats import ALPHA, POWER, Paired, at_upload, detectable_difference, holm, late_gain, paired, verdict

TIE = 0.005  # an interval of the paired difference inside ±TIE is a tie


def task_section(study: Study, out: Path, task: str, img: Path) -> tuple[list[str], list[str]]:
    """The task's Markdown lines and its verdict lines for the summary."""
    d = task_dir(out, task)
    results = task_results(study, out, task)
    refs = task_results(study, out, task, study.references) if study.references else []
    ours = next(r for r in results if r.method == study.reference)
    runs = {m: [run_dir(d, m, s) for s in study.seeds] for m in study.methods}
    plot_curves(runs, study.seeds, d, lines={r.method: r.mean for r in refs})
    for png in ("accuracy_vs_round.png", "accuracy_vs_upload.png"):  # redrawn from the runs, like the tables
        shutil.copyfile(d / png, img / f"{task}_{png}")
    curves = {m: [eval_curve(x) for x in dirs] for m, dirs in runs.items()}
    budget = min(statistics.fmean(c[-1][1] for c in cs) for cs in curves.values())  # the cheapest method's upload
    at_budget = {m: statistics.fmean(at_upload([(u, a) for _, u, a in c], budget) for c in cs)
                 for m, cs in curves.items()}
    others = [r for r in results if r is not ours]
    pairs = {r.method: paired(ours.accs, r.accs) for r in others}
    rivals = [m for m in pairs if METHODS[m].respects_budgets]
    adjusted = dict(zip(rivals, holm([pairs[m].p for m in rivals])))
    name = f"`{study.reference}`"
    rows = [("method", "lr", "accuracy mean ± std", "min – max", f"accuracy at {budget:.3g} MB up",
             "upload MB / client / round", f"{name} − method: mean [95% CI], Holm p → verdict")]
    verdicts = []
    for r in sorted(results, key=lambda r: -r.mean):
        cmp = ""
        if r is not ours:
            p = pairs[r.method]
            adj = adjusted.get(r.method)
            word = verdict(p, adj, TIE) if adj is not None else "reference, no verdict"
            cmp = _interval(p) + (f", p = {adj:.3f}" if adj is not None else "") + f" → {word}"
            if adj is not None:
                verdicts.append(f"`{task}` vs `{r.method}`: **{word}** ({_interval(p)}; {name} ahead on "
                                f"{p.won}, behind on {p.lost} of {len(r.accs)} seeds)")
        rows.append((r.method, f"{r.lr:g}", *_spread(r.accs), f"{at_budget[r.method]:.3f}", f"{r.upload_mb:.3g}", cmp))
    rows += [(f"*{r.method}* (reference)", f"{r.lr:g}", *_spread(r.accs), "", "", _reference_note(r, ours))
             for r in refs]
    lines = ["", f"## Task `{task}`", "", _context(study, out, task), "", _power(study, pairs, rivals), "",
             _flattening(study, results, curves), "", *_table(rows), "",
             f"Accuracy at {budget:.3g} MB: each method's held-out accuracy (interpolated between evaluations) when "
             "its clients had uploaded as much in all as the cheapest method's whole run.", "",
             f"![accuracy vs round]({_rel(img)}/{task}_accuracy_vs_round.png) "
             f"![accuracy vs upload]({_rel(img)}/{task}_accuracy_vs_upload.png)"]
    return lines, verdicts


def _interval(p: Paired) -> str:
    lo, hi = p.interval
    return f"{p.mean:+.3f}" + ("" if math.isinf(p.half_width) else f" [{lo:+.3f}, {hi:+.3f}]")


def _spread(accs: list[float]) -> tuple[str, str]:
    mean, std = mean_std(accs)
    return (f"{mean:.3f} ± {std:.3f}" if len(accs) > 1 else f"{mean:.3f}"), f"{min(accs):.3f} – {max(accs):.3f}"


def _reference_note(ref: MethodResult, ours: MethodResult) -> str:
    gap = ours.mean - ref.mean
    return f"{ours.method} {'+' if gap >= 0 else '−'}{abs(gap):.3f} vs this line (not a competitor)"


def _context(study: Study, out: Path, task: str) -> str:
    d = task_dir(out, task)
    sums = [json.loads((run_dir(d, m, s) / SUMMARY).read_text()) for m in study.methods for s in study.seeds]
    n_test = json.loads((run_dir(d, study.methods[0], study.seeds[0]) / "clients.json").read_text())["test_examples"]
    p = statistics.fmean(x["final_accuracy"] for x in sums)
    return (f"Majority-class accuracy {statistics.fmean(x['majority_accuracy'] for x in sums):.3f}; before any "
            f"training {statistics.fmean(x['initial_accuracy'] for x in sums):.3f} (means over seeds and methods). "
            f"{_same_clients(study, out, task)} Resolution: {n_test} held-out examples, so one example is worth "
            f"{1 / n_test:.4f}, and an accuracy near {p:.2f} has a sampling error of "
            f"±{math.sqrt(p * (1 - p) / n_test):.3f} (one standard error) on top of the spread between seeds.")


def _power(study: Study, pairs: dict[str, Paired], rivals: list[str]) -> str:
    n = len(study.seeds)
    if n < 2 or not rivals:
        return "**Power:** one seed cannot tell any two methods apart; add seeds for verdicts."
    sd = statistics.median(pairs[m].std for m in rivals)
    mdd = detectable_difference(sd, n)
    return (f"**Power:** paired over {n} seeds, with the median spread of the paired differences here ({sd:.3f}), "
            f"a two-sided paired t test at α = {ALPHA} detects a true difference of **{mdd:.3f}** with "
            f"probability {POWER:.0%}; smaller real differences will mostly read as inconclusive. Verdicts are "
            f"Holm-adjusted over the {len(rivals)} comparisons, so the chance of any false win or loss here "
            f"is at most {ALPHA}.")


def _flattening(study: Study, results: list[MethodResult], curves: dict) -> str:
    best = max(results, key=lambda r: r.mean)
    cs = curves[best.method]
    mean_curve = [(cs[0][i][0], statistics.fmean(c[i][2] for c in cs)) for i in range(min(len(c) for c in cs))]
    gain = late_gain(mean_curve)
    spread = mean_std([c[-1][2] for c in cs])[1] / math.sqrt(len(cs))  # standard error of its final mean
    flat = gain <= max(2 * spread, TIE)
    return (f"**Run length:** the best method here, `{best.method}`, gained {gain:+.3f} accuracy over the last third "
            f"of the rounds (mean over seeds; its seeds' standard error is {spread:.3f}): "
            + ("its curve has flattened (the gain is within two standard errors)." if flat else
               "its curve is **still rising**, so longer runs could reorder the methods."))


def _same_clients(study: Study, out: Path, task: str) -> str:
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


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    head, *body = rows
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]


def _rel(img: Path) -> str:
    """The image folder as the report links it (relative to the report's folder)."""
    return img.relative_to(img.parent.parent).as_posix()
