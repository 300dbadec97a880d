"""A study's runs: where each one lives, what the finished ones hold, and running what is missing.

A study is ordinary ``fedlora run`` directories under one output directory (a reference
line lives where a method would, under its own name):

    sweep/<task>/lr<rate>/<method or reference>-seed<sweep seed>/
    tasks/<task>/<method or reference>-seed<seed>/
    ablations/<ablation>/<variant label>/<method>-seed<seed>/

plus ``study_time.json`` (the wall time of every invocation that ran something). Finished
runs are skipped, so the command resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_atomic
from ..compare import SUMMARY, pending_runs, run_dir
from ..compare import write_report as write_compare_report
from ..config import RunConfig, read_toml
from ..run_pool import PendingRun, check_jobs, concurrency, execute
from ..runner import NO_ROUND_AGGREGATED, read_metrics
from .metric import ROUGE_L, Metric, best_rate, headline, is_generative
from .spec import Ablation, Study, Variant

TIMING = "study_time.json"


# -- where each run lives --------------------------------------------------------------

def sweep_dir(out: Path, task: str, lr: float) -> Path:
    return out / "sweep" / task / f"lr{lr:g}"


def task_dir(out: Path, task: str) -> Path:
    return out / "tasks" / task


def variant_dir(out: Path, ablation: Ablation, variant: Variant) -> Path:
    return out / "ablations" / ablation.name / variant.label


def swept(study: Study) -> list[str]:
    """What the sweep runs: every method and the centralised line; the local-only line trains the
    same LoRA on less data, and takes the centralised line's rate (or the task's without it)."""
    return study.methods + [r for r in study.references if r != "local"]


def expected_runs(study: Study, out: Path) -> list[Path]:
    """Every run directory the study is made of: the sweep's, the tasks', the ablations'."""
    dirs, entries = [], study.methods + study.references
    if study.sweep is not None:
        dirs += [run_dir(sweep_dir(out, t, lr), m, study.sweep.seed) for t in study.tasks for lr in study.sweep.lrs
                 for m in swept(study)]
    dirs += [run_dir(task_dir(out, t), m, s) for t in study.tasks for s in study.seeds for m in entries]
    dirs += [run_dir(variant_dir(out, a, v), m, s) for a in study.ablation for v in a.variants
             for s in study.seeds for m in a.methods]
    return dirs


def missing_runs(study: Study, out: Path) -> list[Path]:
    return [d for d in expected_runs(study, out) if not (d / SUMMARY).exists()]


# -- what the finished runs hold -------------------------------------------------------

def final_value(d: Path, metric: Metric) -> float:
    """The run's final held-out ``metric`` (summary.json's ``final_<key>``; see :mod:`fedlora.outputs`)."""
    return float(json.loads((d / SUMMARY).read_text())[f"final_{metric.key}"])


def sweep_value(d: Path, metric: Metric) -> float:
    """A sweep run's final ``metric``; nan where no round was aggregated (every client diverged, say), as
    its value is then the untrained model's, which must not win the sweep."""
    summary = json.loads((d / SUMMARY).read_text())
    return math.nan if summary.get("status") == NO_ROUND_AGGREGATED else float(summary[f"final_{metric.key}"])


def task_metric(study: Study, task: str) -> Metric:
    """What ``task`` is ranked by (accuracy, or the answer loss of a generative task)."""
    return headline(study.task_config(task))


def chosen_lrs(study: Study, out: Path, task: str) -> dict[str, float]:
    """Each method's (and reference's) rate on ``task``: best final sweep metric (highest accuracy or
    lowest answer loss), ties to the smaller rate, never a diverged run ({} without a sweep)."""
    s = study.sweep
    if s is None:
        return {}
    metric = task_metric(study, task)
    lrs = {m: best_rate({lr: sweep_value(run_dir(sweep_dir(out, task, lr), m, s.seed), metric) for lr in s.lrs},
                        metric, f"task {task}, {m}") for m in swept(study)}
    if "local" in study.references and "centralised" in lrs:
        lrs["local"] = lrs["centralised"]
    return lrs


@dataclass
class MethodResult:
    method: str
    lr: float
    values: list[float]  # the task's headline metric, one per seed in study.seeds order
    upload_mb: float  # per client per round, mean over seeds
    total_mb: float  # up + down per client per round, mean over seeds (download is a cost too)
    rouge_l: list[float] | None = None  # a generative task that generates: one per seed

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)


def per_client_round_mb(d: Path, keys: tuple[str, ...]) -> float:
    """The run's traffic in ``keys`` (bytes_up, bytes_down) per client and round, in MB: each round's
    sum over its clients divided by the clients it sampled, averaged over the rounds."""
    sent = [sum(r.get(k, 0.0) for k in keys) / r["clients"] for r in read_metrics(d) if r.get("clients")]
    return statistics.fmean(sent) / 1e6 if sent else 0.0


def task_results(study: Study, out: Path, task: str, names: list[str] | None = None) -> list[MethodResult]:
    """Per method (or reference): each seed's final headline metric (and Rouge-L where a generative task
    generated), the rate its runs used, its mean upload and total traffic per client and round."""
    metric, rows = task_metric(study, task), []
    for m in names or study.methods:
        dirs = [run_dir(task_dir(out, task), m, s) for s in study.seeds]
        sums = [json.loads((d / SUMMARY).read_text()) for d in dirs]
        generated = all(f"final_{ROUGE_L.key}" in x for x in sums)  # eval.generate_examples > 0
        lr = float(read_toml(dirs[0] / "config.toml")["train"]["lr"])  # the rate the runs really used
        rows.append(MethodResult(
            m, lr, [final_value(d, metric) for d in dirs],
            statistics.fmean(per_client_round_mb(d, ("bytes_up",)) for d in dirs),
            statistics.fmean(per_client_round_mb(d, ("bytes_up", "bytes_down")) for d in dirs),
            [float(x[f"final_{ROUGE_L.key}"]) for x in sums] if generated else None))
    return rows


def ablation_values(study: Study, out: Path, a: Ablation) -> dict[str, list[list[float]]]:
    """Method (in ``a.methods`` order) -> per variant -> every seed's final headline metric of the
    ablation's task (seeds in ``study.seeds`` order, so the methods pair seed by seed)."""
    metric = task_metric(study, a.task)
    return {m: [[final_value(run_dir(variant_dir(out, a, v), m, s), metric) for s in study.seeds]
                for v in a.variants] for m in a.methods}


def read_timing(out: Path) -> dict | None:
    """``study_time.json``: elapsed_s, runs and invocations summed over the study's invocations, and the most
    runs one of them ran at a time (max_jobs)."""
    return json.loads((out / TIMING).read_text()) if (out / TIMING).exists() else None


# -- running what is missing -----------------------------------------------------------

def final_only(study: Study, task: str, overrides: Sequence[str] = ()) -> RunConfig:
    """``task``'s config with ``overrides``, evaluated only after the last round, for the runs of which
    the study keeps only the final headline metric (sweeps, ablations): evaluation is about a third of
    a run's time. A generative task's answer loss does not need generations, so these runs skip them."""
    cfg = study.task_config(task, overrides)
    final = [*overrides, f"federation.eval_every={cfg.federation.rounds}"]
    if is_generative(cfg):
        final.append("eval.generate_examples=0")
    return study.task_config(task, final)


@dataclass
class Phase:
    """Runs that can go side by side (none needs another's result), and the comparison directories
    whose ``results.md`` they complete."""

    runs: list[PendingRun] = field(default_factory=list)
    reports: list[tuple[Path, list[str], list[int]]] = field(default_factory=list)

    def add_methods(self, cfg: RunConfig, methods: list[str], seeds: list[int], out: Path,
                    lrs: dict[str, float]) -> None:
        self.runs += pending_runs(cfg, methods, seeds, out, lrs)
        self.reports.append((out, methods, seeds))

    def add_references(self, cfg: RunConfig, references: list[str], seeds: list[int], out: Path,
                       lrs: dict[str, float]) -> None:
        for ref in references:
            for seed in seeds:
                train = dataclasses.replace(cfg.train, lr=lrs.get(ref, cfg.train.lr))
                d = run_dir(out, ref, seed)
                one = dataclasses.replace(cfg, seed=seed, train=train, output_dir=str(d))
                if not (d / SUMMARY).exists():
                    self.runs.append(PendingRun(one, f"reference {ref}, seed {seed}", reference=ref))

    def run(self, jobs: int, progress: bool, on_done: Callable[[PendingRun], None]) -> None:
        execute(self.runs, jobs, progress, on_done)
        for out, methods, seeds in self.reports:  # each directory's own `fedlora compare` table
            write_compare_report(out, methods, seeds)


def sweep_phase(study: Study, out: Path) -> Phase:
    """Every rate of the sweep, for every method and swept reference on every task."""
    phase = Phase()
    for task in study.tasks if study.sweep is not None else []:
        for lr in study.sweep.lrs:
            cfg, d = final_only(study, task, [f"train.lr={lr}"]), sweep_dir(out, task, lr)
            phase.add_methods(cfg, study.methods, [study.sweep.seed], d, {})
            phase.add_references(cfg, swept(study)[len(study.methods):], [study.sweep.seed], d, {})
    return phase


def main_phase(study: Study, out: Path) -> Phase:
    """Every method and reference line on every task and seed, and every ablation variant, each at the
    rate the sweep chose (needs the sweep finished)."""
    phase, lrs = Phase(), {task: chosen_lrs(study, out, task) for task in study.tasks}
    for task in study.tasks:
        cfg, d = study.task_config(task), task_dir(out, task)
        phase.add_methods(cfg, study.methods, study.seeds, d, lrs[task])
        phase.add_references(cfg, study.references, study.seeds, d, lrs[task])
    for a in study.ablation:
        for v in a.variants:
            phase.add_methods(final_only(study, a.task, v.overrides), a.methods, study.seeds,
                              variant_dir(out, a, v), lrs[a.task])
    return phase


class StudyClock:
    """``study_time.json`` brought up to date after every finished run, so that an invocation killed
    outright (SIGKILL, a machine's end) still counts its wall time up to its last finished run."""

    def __init__(self, out: Path) -> None:
        self.out, self.jobs = out, 1  # jobs: the most runs this invocation has had going at once
        self.since = time.perf_counter()
        self.counted = False  # this invocation is among `invocations` already

    def add(self, runs: int) -> None:
        now, t = time.perf_counter(), read_timing(self.out) or {}
        t = {"elapsed_s": t.get("elapsed_s", 0.0) + now - self.since, "runs": t.get("runs", 0) + runs,
             "invocations": t.get("invocations", 0) + (not self.counted),
             "max_jobs": max(t.get("max_jobs", 1), self.jobs)}
        write_atomic(self.out / TIMING, json.dumps(t) + "\n")
        self.since, self.counted = now, True

    def finished(self, _run: PendingRun) -> None:
        self.add(1)

    def close(self) -> None:
        """The time after the last finished run (an interrupted one's partial work), for an invocation
        that did any; one that finished nothing is not counted (as before a run is done, nothing is)."""
        if self.counted:
            self.add(0)


def run_study(study: Study, out: Path, progress: bool = True, jobs: int = 1) -> None:
    """Run whatever is missing, ``jobs`` runs at a time: first the sweep, then everything else."""
    check_jobs(jobs)
    todo = len(missing_runs(study, out))
    if progress:
        print(f"study: {todo} of {len(expected_runs(study, out))} runs to do -> {out}", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    clock = StudyClock(out)
    try:
        for what, plan in (("the learning-rate sweep", sweep_phase), ("tasks x seeds and ablations", main_phase)):
            phase = plan(study, out)  # the main phase reads the rates the sweep chose
            if progress and phase.runs:
                print(f"study: {what}, {len(phase.runs)} runs", file=sys.stderr, flush=True)
            clock.jobs = max(clock.jobs, concurrency(jobs, len(phase.runs)))
            phase.run(jobs, progress, clock.finished)
    finally:
        clock.close()
