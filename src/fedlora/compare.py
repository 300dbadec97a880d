"""``fedlora compare``: every method on the identical split, budgets and seeds.

Each (method, seed) pair is one ordinary run in ``<out>/<method>-seed<seed>/``; a pair
whose ``summary.json`` exists is finished and skipped, an interrupted one continues from
its last checkpoint, so re-running resumes. The
report is ``results.md`` + ``results.csv``, the metric against round and upload, and
``diagnostics.png`` (aggregation fidelity and effective rank by round).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from collections.abc import Mapping
from pathlib import Path

from .config import RunConfig, read_toml
from .errors import ConfigError
from .models import resolve_targets
from .outdir import changed_settings
from .outputs import LABELS
from .run_pool import PendingRun, check_jobs, execute
from .runner import SUMMARY, read_metrics
from .strategies import METHODS
from .study.plots import plot_curves, plot_diagnostics


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / f"{method}-seed{seed}"


def compare(cfg: RunConfig, methods: list[str], seeds: list[int], out: Path,
            progress: bool = True, lrs: Mapping[str, float] | None = None, jobs: int = 1) -> Path:
    """Run what is missing (``jobs`` at a time), then write the report; return the path of results.md.

    ``lrs`` gives a method its own learning rate (e.g. from a sweep); the others use
    ``cfg.train.lr``.
    """
    check_jobs(jobs)  # before any directory is made
    execute(pending_runs(cfg, methods, seeds, out, lrs), jobs, progress)
    return write_report(out, methods, seeds)


def pending_runs(cfg: RunConfig, methods: list[str], seeds: list[int], out: Path,
                 lrs: Mapping[str, float] | None = None) -> list[PendingRun]:
    """The (method, seed) runs of a comparison that are not finished in ``out``; a started one resumes."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if not methods or not seeds:
        raise ConfigError("--methods and --seeds need at least one entry each")
    out.mkdir(parents=True, exist_ok=True)
    cfg.model.targets = resolve_targets(cfg.model)  # as each run's config.toml records them
    pending = []
    for seed in seeds:
        for method in methods:
            d = run_dir(out, method, seed)
            train = dataclasses.replace(cfg.train, lr=(lrs or {}).get(method, cfg.train.lr))
            own = {m: s for m, s in cfg.strategy.settings.items() if m == method}  # its own table only
            strategy = dataclasses.replace(cfg.strategy, name=method, settings=own)
            one = dataclasses.replace(cfg, seed=seed, output_dir=str(d), train=train, strategy=strategy)
            one.validate()
            started = (d / "metrics.jsonl").exists() and (d / "config.toml").exists()
            if started:  # never mix two setups in one table
                changed = changed_settings(one, d)
                if changed:
                    key, there, now = changed[0]
                    raise ConfigError(f"{d} holds a run with a different {key} ({there!r} there, {now!r} now); "
                                      "choose another --out, or delete that directory to rerun it")
            if not (d / SUMMARY).exists():
                pending.append(PendingRun(one, f"{method}, seed {seed}", resume=started))
    return pending


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def final_metric(summary: dict) -> tuple[str, float]:
    """(name, value) of the metric that scores a finished run (older summaries: accuracy)."""
    return summary.get("final_metric_name", "accuracy"), summary.get("final_metric", summary.get("final_accuracy"))


def write_report(out: Path, methods: list[str], seeds: list[int]) -> Path:
    rows = []
    name = "accuracy"
    for m in methods:
        runs = [read_metrics(run_dir(out, m, s)) for s in seeds]
        sums = [json.loads((run_dir(out, m, s) / SUMMARY).read_text()) for s in seeds]
        name = final_metric(sums[0])[0]
        acc_mean, acc_std = mean_std([final_metric(s)[1] for s in sums])
        lr = read_toml(run_dir(out, m, seeds[0]) / "config.toml")["train"]["lr"]
        rows.append({
            "method": m,
            "lr": lr,
            f"final_{name}_mean": acc_mean,
            f"final_{name}_std": acc_std,
            f"initial_{name}": statistics.fmean(s.get("initial_metric", s.get("initial_accuracy")) for s in sums),
            "upload_MB": statistics.fmean(sum(r.get("bytes_up", 0) for r in rs) for rs in runs) / 1e6,
            "download_MB": statistics.fmean(sum(r.get("bytes_down", 0) for r in rs) for rs in runs) / 1e6,
            # up + down: a method that uploads little may download much (FLoRA's delta, a fold)
            "total_MB": statistics.fmean(sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in rs)
                                         for rs in runs) / 1e6,
            "wall_time_s": statistics.fmean(s["wall_time_s"] for s in sums),
        })
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    label = LABELS[name][0].upper() + LABELS[name][1:]
    lines = [
        f"Seeds: {', '.join(map(str, seeds))}. {label} on the global held-out set after the last "
        f"round{' (mean ± std over seeds)' if len(seeds) > 1 else ''}; traffic summed over all rounds and "
        f"clients{' (mean over seeds)' if len(seeds) > 1 else ''}.",
        "",
        f"| method | lr | final {LABELS[name]} | upload (MB) | total up + down (MB) | download (MB) | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = f" ± {r[f'final_{name}_std']:.3f}" if len(seeds) > 1 else ""  # no spread of one draw
        lines.append(f"| {r['method']} | {r['lr']:g} | {r[f'final_{name}_mean']:.3f}{spread} "
                     f"| {r['upload_MB']:.2f} | {r['total_MB']:.2f} | {r['download_MB']:.2f} "
                     f"| {r['wall_time_s']:.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    runs = {m: [run_dir(out, m, s) for s in seeds] for m in methods}
    plot_curves(runs, seeds, out, name)
    plot_diagnostics(runs, out)  # how exact each aggregation was, and rank collapse
    return out / "results.md"

