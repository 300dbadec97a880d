"""One generative task's part of the study report: every method and reference line by held-out answer
loss (lower is better) and Rouge-L (higher is better), each as mean ± standard error over seeds, its
traffic per client and round, and the reference method's paired differences over seeds (t intervals;
Holm-adjusted verdicts on the loss), with what the design can detect and whether the runs were long
enough."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from ..compare import SUMMARY, run_dir
from ..runner import eval_curve
from .metric import LOSS, ROUGE_L, Metric
from .plots import plot_curves
from .runner import MethodResult, task_dir
from .section import (
    TOTAL,
    Comparison,
    compare_with_reference,
    detectable,
    flattening,
    power,
    reference_note,
    rel,
    same_clients,
    table,
    task_runs,
)
from .spec import Study
from .stats import POWER, mean_stderr


def lm_task_section(study: Study, out: Path, task: str, img: Path) -> tuple[list[str], list[str]]:
    """The task's Markdown lines and its verdict lines (on the answer loss) for the summary."""
    t = task_runs(study, out, task)
    d, results, refs, ours, runs = t.folder, t.results, t.refs, t.ours, t.runs
    generated = all(r.rouge_l is not None for r in results)  # eval.generate_examples > 0
    metrics = [LOSS, ROUGE_L] if generated else [LOSS]
    figures = []
    for metric in metrics:
        lines = {r.method: statistics.fmean(v) for r in refs if (v := _values(r, metric))}
        plot_curves(runs, study.seeds, d, metric.key, lines=lines)
        for x in ("round", "upload"):  # redrawn from the runs, like the tables
            png = f"{metric.key}_vs_{x}.png"
            shutil.copyfile(d / png, img / f"{task}_{png}")
            figures.append(f"![{metric.label} vs {x}]({rel(img)}/{task}_{png})")
    loss = compare_with_reference(study, results, LOSS, lambda r: r.values)
    rouge = compare_with_reference(study, results, ROUGE_L, lambda r: r.rouge_l) if generated else None
    name = f"`{study.reference}`"
    rows = [("method", "lr", "answer loss mean ± s.e.", *(["Rouge-L mean ± s.e."] if rouge else []),
             "upload MB / client / round", TOTAL, f"{name} − method, answer loss: mean [95% CI], Holm p → verdict",
             *([f"{name} − method, Rouge-L: mean [95% CI]"] if rouge else []))]
    verdicts = []
    for r in sorted(results, key=lambda r: r.mean):  # the lowest loss first
        if r is not ours and (line := loss.verdict_line(task, r.method, len(r.values))):
            verdicts.append(line)
        rows.append((r.method, f"{r.lr:g}", *(_mean_se(_values(r, m)) for m in metrics), f"{r.upload_mb:.3g}",
                     f"{r.total_mb:.3g}", loss.cell(r.method) if r is not ours else "",
                     *([rouge.cell(r.method, with_verdict=False) if r is not ours else ""] if rouge else [])))
    rows += [(f"*{r.method}* (reference)", f"{r.lr:g}", *(_mean_se(_values(r, m)) for m in metrics), "", "",
              reference_note(r, ours), *([""] if rouge else [])) for r in refs]
    curves = {m: [eval_curve(x, LOSS.key) for x in dirs] for m, dirs in runs.items()}
    lines = ["", f"## Task `{task}`", "", _context(study, out, task, generated), "",
             power(study, loss) + (_rouge_power(study, rouge) if rouge else ""), "",
             flattening(results, curves, LOSS), "",
             *table(rows), "", " ".join(figures)]
    return lines, verdicts


def _values(r: MethodResult, metric: Metric) -> list[float]:
    return r.values if metric == LOSS else (r.rouge_l or [])


def _mean_se(xs: list[float]) -> str:
    """Mean ± standard error over seeds; blank for a line that has none, the mean alone for one seed."""
    if not xs:
        return ""
    mean, se = mean_stderr(xs)
    return f"{mean:.3f} ± {se:.3f}" if len(xs) > 1 else f"{mean:.3f}"


def _context(study: Study, out: Path, task: str, generated: bool) -> str:
    """What the numbers were computed on, their sign convention, and the same-clients check."""
    d = task_dir(out, task)
    sums = [json.loads((run_dir(d, m, s) / SUMMARY).read_text()) for m in study.methods for s in study.seeds]
    n_test = sums[0]["test_examples"]
    text = (f"Answer loss: the mean cross-entropy per answer token on {n_test} held-out examples after the last "
            f"round (before any training {statistics.fmean(x['initial_loss'] for x in sums):.3f}, the mean over "
            "seeds and methods); **lower is better**.")
    if generated:
        text += (f" Rouge-L: greedy generations for {sums[0]['generated_examples']} of those prompts against their "
                 "reference answers; higher is better.")
        if all("final_rouge_l_stderr" in x for x in sums):
            se = statistics.fmean(x["final_rouge_l_stderr"] for x in sums)
            text += (f" One run's Rouge-L has a sampling error of ±{se:.3f} over its prompts (one standard error, "
                     "mean over runs) on top of the spread between seeds.")
    return (f"{text} Table: mean ± standard error over the {len(study.seeds)} seeds. Differences are "
            f"`{study.reference}` − method, seed by seed: a **negative** answer-loss difference and a **positive** "
            f"Rouge-L difference mean `{study.reference}` is better. {same_clients(study, out, task)}")


def _rouge_power(study: Study, rouge: Comparison) -> str:
    found = detectable(study, rouge)
    if found is None:
        return ""
    sd, mdd = found
    return (f" For Rouge-L (no verdicts, intervals only), the median spread of the paired differences is {sd:.3f}, "
            f"so a true difference of {mdd:.3f} would be detected with probability {POWER:.0%}.")
