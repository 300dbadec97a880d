"""One classification task's part of the study report: the table of every method and reference line,
paired verdicts of the reference method against every other (t intervals, Holm-adjusted), accuracy
at equal upload, whether the runs were long enough, and what the design can detect. A generative
task's part is :mod:`fedlora.study.lm_report`."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

from ..compare import SUMMARY, mean_std, run_dir
from ..runner import eval_curve
from .metric import ACCURACY
from .plots import plot_curves
from .runner import task_dir
from .section import (
    TOTAL,
    compare_with_reference,
    flattening,
    power,
    reference_note,
    rel,
    same_clients,
    table,
    task_runs,
)
from .spec import Study
from .stats import at_upload


def task_section(study: Study, out: Path, task: str, img: Path) -> tuple[list[str], list[str]]:
    """The task's Markdown lines and its verdict lines for the summary."""
    t = task_runs(study, out, task)
    d, results, refs, ours, runs = t.folder, t.results, t.refs, t.ours, t.runs
    plot_curves(runs, study.seeds, d, lines={r.method: r.mean for r in refs})
    for png in ("accuracy_vs_round.png", "accuracy_vs_upload.png"):  # redrawn from the runs, like the tables
        shutil.copyfile(d / png, img / f"{task}_{png}")
    curves = {m: [eval_curve(x) for x in dirs] for m, dirs in runs.items()}
    budget = min(statistics.fmean(c[-1][1] for c in cs) for cs in curves.values())  # the cheapest method's upload
    at_budget = {m: statistics.fmean(at_upload([(u, a) for _, u, a in c], budget) for c in cs)
                 for m, cs in curves.items()}
    cmp = compare_with_reference(study, results, ACCURACY, lambda r: r.values)
    name = f"`{study.reference}`"
    rows = [("method", "lr", "accuracy mean ± std", "min – max", f"accuracy at {budget:.3g} MB up",
             "upload MB / client / round", TOTAL, f"{name} − method: mean [95% CI], Holm p → verdict")]
    verdicts = []
    for r in sorted(results, key=lambda r: -r.mean):
        if r is not ours and (line := cmp.verdict_line(task, r.method, len(r.values))):
            verdicts.append(line)
        rows.append((r.method, f"{r.lr:g}", *_spread(r.values), f"{at_budget[r.method]:.3f}", f"{r.upload_mb:.3g}",
                     f"{r.total_mb:.3g}", cmp.cell(r.method) if r is not ours else ""))
    rows += [(f"*{r.method}* (reference)", f"{r.lr:g}", *_spread(r.values), "", "", "", reference_note(r, ours))
             for r in refs]
    lines = ["", f"## Task `{task}`", "", _context(study, out, task), "", power(study, cmp), "",
             flattening(results, curves, ACCURACY), "", *table(rows), "",
             f"Accuracy at {budget:.3g} MB: each method's held-out accuracy (interpolated between evaluations) when "
             "its clients had uploaded as much in all as the cheapest method's whole run.", "",
             f"![accuracy vs round]({rel(img)}/{task}_accuracy_vs_round.png) "
             f"![accuracy vs upload]({rel(img)}/{task}_accuracy_vs_upload.png)"]
    return lines, verdicts


def _spread(accs: list[float]) -> tuple[str, str]:
    mean, std = mean_std(accs)
    return (f"{mean:.3f} ± {std:.3f}" if len(accs) > 1 else f"{mean:.3f}"), f"{min(accs):.3f} – {max(accs):.3f}"


def _context(study: Study, out: Path, task: str) -> str:
    d = task_dir(out, task)
    sums = [json.loads((run_dir(d, m, s) / SUMMARY).read_text()) for m in study.methods for s in study.seeds]
    n_test = json.loads((run_dir(d, study.methods[0], study.seeds[0]) / "clients.json").read_text())["test_examples"]
    p = statistics.fmean(x["final_accuracy"] for x in sums)
    return (f"Majority-class accuracy {statistics.fmean(x['majority_accuracy'] for x in sums):.3f}; before any "
            f"training {statistics.fmean(x['initial_accuracy'] for x in sums):.3f} (means over seeds and methods). "
            f"{same_clients(study, out, task)} Resolution: {n_test} held-out examples, so one example is worth "
            f"{1 / n_test:.4f}, and an accuracy near {p:.2f} has a sampling error of "
            f"±{math.sqrt(p * (1 - p) / n_test):.3f} (one standard error) on top of the spread between seeds.")
