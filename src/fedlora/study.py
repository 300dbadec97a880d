"""``fedlora study``: which method gives the best global model for the same client cost?

A study file (``configs/study/study.toml``) names the tasks (one run config each), the
methods, the seeds, one learning-rate grid and the ablations. The study then

1. sweeps the grid for every method on one task and a seed that is not reported
   (its own client split and held-out sample), and picks each method's rate the same
   way: best final accuracy, ties to the smaller rate;
2. runs every method x seed on every task with those rates (``fedlora compare``);
3. runs each ablation's variants (one method, every seed);
4. writes the report (Markdown + plots) from the run directories alone.

Every run is an ordinary ``fedlora run`` directory; finished ones are skipped, so the
command resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .compare import SUMMARY, compare, mean_std, plot_curves, run_dir
from .config import ConfigError, RunConfig, load_config, read_toml
from .strategies import METHODS

TIMING = "study_time.json"


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: list[str]


@dataclass(frozen=True)
class Ablation:
    name: str
    title: str
    task: str
    method: str
    x_label: str
    variants: list[Variant]
    note: str = ""  # printed under the ablation's table (e.g. what else changes with x)


@dataclass(frozen=True)
class Study:
    path: Path
    tasks: dict[str, Path]  # task name -> run config
    methods: list[str]
    seeds: list[int]
    sweep_task: str | None  # None: no sweep, every method keeps each task's configured rate
    sweep_seed: int
    lrs: list[float]
    ablations: list[Ablation]

    def task_config(self, task: str, overrides: list[str] = ()) -> RunConfig:
        return load_config(self.tasks[task], list(overrides), methods=set(self.methods))


def _get(table: dict, key: str, kind: type, where: str):
    if key not in table:
        raise ConfigError(f"{where}: missing '{key}'")
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    return value


def _items(table: dict, key: str, kind: type, where: str, default: list | None = None) -> list:
    """A list whose entries all have type ``kind`` (ints accepted as floats), without repeats."""
    if default is not None and key not in table:
        return default
    values = _get(table, key, list, where)
    out = [_get({key: v}, key, kind, where) for v in values]
    if kind is not dict and len(set(out)) != len(out):
        raise ConfigError(f"{where}.{key}: repeated entries in {values}")
    return out


def _only(table: dict, keys: set[str], where: str) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (valid: {', '.join(sorted(keys))})")


def _unique(names: list[str], where: str) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{where}: repeated name '{repeated[0]}'")


def _method(name: str, where: str) -> str:
    if name not in METHODS:
        raise ConfigError(f"{where}: unknown ['{name}']; choose from {', '.join(METHODS)}")
    return name


def load_study(path: str | Path) -> Study:
    """Read and check a study file; task configs are resolved relative to it.

    Every mistake is a ConfigError naming the file and key, raised before any run starts.
    """
    p = Path(path)
    data = read_toml(p, "study")
    _only(data, {"methods", "seeds", "task", "sweep", "ablation"}, p.name)
    tasks: dict[str, Path] = {}
    task_tables = _items(data, "task", dict, p.name)
    if not task_tables:
        raise ConfigError(f"{p.name}: needs at least one [[task]]")
    _unique([t.get("name") for t in task_tables], f"{p.name}: task")
    for i, t in enumerate(task_tables):
        where = f"{p.name}: task[{i}]"
        _only(t, {"name", "config"}, where)
        cfg = p.parent / _get(t, "config", str, where)
        if not cfg.is_file():
            raise ConfigError(f"{where}: config file not found: {cfg}")
        tasks[_get(t, "name", str, where)] = cfg
    methods = [_method(m, f"{p.name}: methods") for m in _items(data, "methods", str, p.name)]
    seeds = _items(data, "seeds", int, p.name)
    if not methods or not seeds:
        raise ConfigError(f"{p.name}: methods and seeds need at least one entry each")
    sweep_task, sweep_seed, lrs = None, -1, []
    if "sweep" in data:
        sweep = _get(data, "sweep", dict, p.name)
        where = f"{p.name}: sweep"
        _only(sweep, {"task", "seed", "lrs"}, where)
        sweep_task, sweep_seed = _get(sweep, "task", str, where), _get(sweep, "seed", int, where)
        lrs = _items(sweep, "lrs", float, where)
        if not lrs or any(lr <= 0 for lr in lrs):
            raise ConfigError(f"{where}.lrs: needs positive learning rates, got {lrs}")
        if sweep_seed in seeds:
            raise ConfigError(f"{where}.seed: {sweep_seed} is also a reported seed; the sweep needs a "
                              "seed that is not reported")
    ablations = []
    for i, a in enumerate(_items(data, "ablation", dict, p.name, default=[])):
        where = f"{p.name}: ablation[{i}]"
        _only(a, {"name", "title", "task", "method", "x_label", "note", "variants"}, where)
        variants = []
        for v in _items(a, "variants", dict, where):
            _only(v, {"label", "set"}, f"{where}.variants")
            variants.append(Variant(_get(v, "label", str, f"{where}.variants"),
                                    _items(v, "set", str, f"{where}.variants")))
        if not variants:
            raise ConfigError(f"{where}: needs at least one variant")
        _unique([v.label for v in variants], f"{where}.variants")
        ablations.append(Ablation(_get(a, "name", str, where), _get(a, "title", str, where),
                                  _get(a, "task", str, where), _method(_get(a, "method", str, where), where),
                                  _get(a, "x_label", str, where), variants,
                                  _get(a, "note", str, where) if "note" in a else ""))
    _unique([a.name for a in ablations], f"{p.name}: ablation")
    study = Study(p, tasks, methods, seeds, sweep_task, sweep_seed, lrs, ablations)
    for task in [sweep_task or next(iter(tasks)), *(a.task for a in ablations)]:
        if task not in tasks:
            raise ConfigError(f"{p.name}: unknown task '{task}' (tasks: {', '.join(tasks)})")
    for task in tasks:  # every config loads before hours of compute start
        study.task_config(task)
    for a in ablations:
        for v in a.variants:
            study.task_config(a.task, v.overrides)
    return study


# -- layout of the output directory ---------------------------------------------------

def sweep_dir(out: Path, lr: float) -> Path:
    return out / "sweep" / f"lr{lr:g}"


def task_dir(out: Path, task: str) -> Path:
    return out / "tasks" / task


def variant_dir(out: Path, ablation: Ablation, variant: Variant) -> Path:
    return out / "ablations" / ablation.name / variant.label


def final_accuracy(d: Path) -> float:
    return json.loads((d / SUMMARY).read_text())["final_accuracy"]


def chosen_lrs(study: Study, out: Path) -> dict[str, float]:
    """Each method's rate: best sweep accuracy, ties to the smaller rate ({} without a sweep)."""
    if study.sweep_task is None:
        return {}
    return {m: max(sorted(study.lrs), key=lambda lr: (final_accuracy(run_dir(sweep_dir(out, lr), m,
                                                                              study.sweep_seed)), -lr))
            for m in study.methods}


def expected_runs(study: Study, out: Path) -> list[Path]:
    """Every run directory the study is made of, in the order they run."""
    dirs = [run_dir(sweep_dir(out, lr), m, study.sweep_seed) for lr in study.lrs for m in study.methods]
    dirs += [run_dir(task_dir(out, t), m, s) for t in study.tasks for s in study.seeds for m in study.methods]
    dirs += [run_dir(variant_dir(out, a, v), a.method, s) for a in study.ablations for v in a.variants
             for s in study.seeds]
    return dirs


def missing_runs(study: Study, out: Path) -> list[Path]:
    return [d for d in expected_runs(study, out) if not (d / SUMMARY).exists()]


def run_study(study: Study, out: Path, progress: bool = True) -> dict[str, float]:
    """Run whatever is missing; return each method's chosen learning rate."""
    start = time.perf_counter()
    todo = len(missing_runs(study, out))
    steps = len(study.lrs) + len(study.tasks) + sum(len(a.variants) for a in study.ablations)
    step = 0

    def announce(what: str) -> None:
        nonlocal step
        step += 1
        if progress:
            print(f"study [{step}/{steps}] {what}", file=sys.stderr, flush=True)

    if progress:
        print(f"study: {todo} of {len(expected_runs(study, out))} runs to do -> {out}", file=sys.stderr, flush=True)
    try:
        for lr in study.lrs:
            announce(f"sweep lr={lr:g} on {study.sweep_task}, seed {study.sweep_seed}")
            compare(study.task_config(study.sweep_task, [f"train.lr={lr}"]), study.methods,
                    [study.sweep_seed], sweep_dir(out, lr), progress=progress)
        lrs = chosen_lrs(study, out)
        for task in study.tasks:
            announce(f"task {task}: {len(study.methods)} methods x {len(study.seeds)} seeds")
            compare(study.task_config(task), study.methods, study.seeds, task_dir(out, task), progress, lrs=lrs)
        for a in study.ablations:
            for v in a.variants:
                announce(f"ablation {a.name}: {v.label}")
                cfg = study.task_config(a.task, v.overrides)
                compare(cfg, [a.method], study.seeds, variant_dir(out, a, v), progress, lrs=lrs)
    finally:  # the wall time of every invocation that did work adds up (also when one is interrupted)
        ran = todo - len(missing_runs(study, out))
        if ran:
            timing = json.loads((out / TIMING).read_text()) if (out / TIMING).exists() else {}
            timing = {"elapsed_s": timing.get("elapsed_s", 0.0) + time.perf_counter() - start,
                      "runs": timing.get("runs", 0) + ran, "invocations": timing.get("invocations", 0) + 1}
            (out / TIMING).write_text(json.dumps(timing) + "\n")
    return lrs


# -- the report -----------------------------------------------------------------------

@dataclass
class MethodResult:
    method: str
    lr: float
    accs: list[float]  # one per seed, in study.seeds order
    upload_mb: float  # per client per round, mean over seeds

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accs) if len(self.accs) > 1 else 0.0


def run_lr(d: Path) -> float:
    """The learning rate a finished run really used (from its own config.toml)."""
    return float(read_toml(d / "config.toml")["train"]["lr"])


def task_results(study: Study, out: Path, task: str) -> list[MethodResult]:
    rows = []
    for m in study.methods:
        dirs = [run_dir(task_dir(out, task), m, s) for s in study.seeds]
        uploads = []
        for d in dirs:
            records = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            sent = [r["bytes_up"] / r["clients"] for r in records if r.get("clients")]
            uploads.append(statistics.fmean(sent) / 1e6 if sent else 0.0)
        rows.append(MethodResult(m, run_lr(dirs[0]), [final_accuracy(d) for d in dirs], statistics.fmean(uploads)))
    return rows


TIE = 0.005  # mean paired differences smaller than this are called ties


@dataclass(frozen=True)
class Verdict:
    word: str  # win, loss, tie or inconclusive
    mean: float  # mean over seeds of (ours - theirs)
    std: float  # spread of those paired differences
    won: int  # seeds where ours is ahead
    lost: int  # seeds where ours is behind


def verdict(ours: MethodResult, other: MethodResult) -> Verdict:
    """Paired over seeds (same split and budgets).

    tie: mean gap under TIE; win: ahead on average and behind on no seed; loss: the
    reverse; inconclusive: the seeds disagree (ahead on some, behind on others). One
    seed decides nothing: its words are "ahead" and "behind".
    """
    diffs = [a - b for a, b in zip(ours.accs, other.accs)]
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    won, lost = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    if abs(mean) < TIE:
        word = "tie"
    elif len(diffs) == 1:
        word = "ahead" if mean > 0 else "behind"
    elif mean > 0 and lost == 0:
        word = "win"
    elif mean < 0 and won == 0:
        word = "loss"
    else:
        word = "inconclusive"
    return Verdict(word, mean, std, won, lost)


def _setup_rows(study: Study) -> list[tuple[str, ...]]:
    cfgs = {t: study.task_config(t) for t in study.tasks}

    def row(label, fn):
        return (label, *(str(fn(c)) for c in cfgs.values()))

    return [
        ("", *cfgs),
        row("model (LoRA targets)", lambda c: f"{c.model.name} ({', '.join(c.model.targets)}"
            + (" + classifier head)" if c.model.task == "classification" else ")")),
        row("data", lambda c: c.data.name + (f" [{c.data.label_column}]" if c.data.label_column != "label" else "")),
        row("clients / per round", lambda c: f"{c.data.num_clients} / {_per_round(c)}"),
        row("split", lambda c: f"{c.data.partition}, alpha={c.data.alpha:g}"),
        row("client budgets k_i", lambda c: f"{c.budgets.ranks} ({c.budgets.distribution})"),
        row("global rank r, LoRA alpha", lambda c: f"{c.strategy.global_rank}, {c.strategy.alpha:g}"),
        row("rounds x local steps x batch", lambda c: f"{c.federation.rounds} x {c.train.local_steps} x "
                                                      f"{c.train.batch_size}"),
        row("max tokens, held-out examples", lambda c: f"{c.model.max_length}, {c.data.test_size}"),
    ]


def _per_round(c: RunConfig) -> str:
    return str(c.federation.clients_per_round) if c.federation.clients_per_round else f"{c.federation.fraction:.0%}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    head, *body = rows
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]


def _plot_ablations(study: Study, out: Path, img: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for a in study.ablations:
        accs = [[final_accuracy(run_dir(variant_dir(out, a, v), a.method, s)) for s in study.seeds]
                for v in a.variants]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = range(len(a.variants))
        for s_i in range(len(study.seeds)):
            ax.plot(xs, [acc[s_i] for acc in accs], "o", alpha=0.35, color="grey",
                    label="one seed" if s_i == 0 else None)
        ax.errorbar(xs, [statistics.fmean(x) for x in accs],
                    yerr=[statistics.stdev(x) if len(x) > 1 else 0 for x in accs],
                    marker="s", capsize=4, label="mean ± std")
        ax.set_xticks(list(xs), [v.label for v in a.variants])
        ax.set_xlabel(a.x_label)
        ax.set_ylabel("final test accuracy")
        ax.set_title(a.title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"ablation_{a.name}.png"
        fig.savefig(img / name, dpi=120)
        plt.close(fig)
        names.append(name)
    return names


def write_report(study: Study, out: Path, report: Path) -> Path:
    """``report`` (Markdown) and its plots under ``report.parent/img/<report stem>``, from ``out`` alone."""
    missing = missing_runs(study, out)
    if missing:
        raise ConfigError(f"{len(missing)} of the study's runs are not finished in {out} (first: {missing[0]}); "
                          "run the study without --report-only to make them")
    lrs = chosen_lrs(study, out)
    img = report.parent / "img" / report.stem
    img.mkdir(parents=True, exist_ok=True)
    rel = img.relative_to(report.parent).as_posix()
    timing = json.loads((out / TIMING).read_text()) if (out / TIMING).exists() else None
    runs = expected_runs(study, out)
    total_run_s = sum(json.loads((d / SUMMARY).read_text())["wall_time_s"] for d in runs)
    cost = f"**Cost:** {len(runs)} runs, {total_run_s / 60:.1f} min of run time"
    if timing:
        n = timing.get("invocations", 1)
        cost += (f"; the {'invocation' if n == 1 else f'{n} invocations'} of the study command that ran "
                 f"them took {timing['elapsed_s'] / 60:.1f} min wall in all on this machine")
    fullrank = "`fullrank` ignores the budgets (every client trains rank r): the field's \"full-rank upper " \
               "bound\", a reference that breaks the budgets, not a competitor (nor always the best)."
    lines = [
        "# Accuracy study: heterogeneous-rank federated LoRA, every method on the same footing",
        "",
        "Generated by `fedlora study " + _display(study.path) + "` from its run directories; "
        "do not edit by hand. Every number below is a final global test accuracy (held-out set "
        "after the last round).",
        "",
        cost + ".",
        "",
        "## Setup (identical for every method" + (", except the learning rate chosen below)"
                                                   if study.sweep_task else ")"),
        "",
        *_table(_setup_rows(study)),
        "",
        f"Seed{'s' if len(study.seeds) > 1 else ''} {', '.join(map(str, study.seeds))}: "
        "the seed fixes the client split, the budgets' "
        "assignment, the held-out sample, initialisation and batches, and is the same for every method. "
        "Methods: `fslora` sketches a k_i-sized block of the global rank-r pair per client per round; "
        "`flexlora` trains rank k_i and gets the SVD truncation of the averaged product; `hetlora` zero-pads "
        "to the largest budget; `flora` stacks and merges into the base; `fedit` puts every client at the "
        "smallest budget; `ffa` freezes A and trains B at rank k_i; " + fullrank,
        "",
    ]
    lines += _sweep_section(study, out, lrs)
    verdicts: list[str] = []
    for task in study.tasks:
        section, task_verdicts = _task_section(study, out, task, img)
        lines += section
        verdicts += task_verdicts
    if verdicts:
        rule = (f"Paired over the {len(study.seeds)} seeds (same split and budgets; ± is the spread of the "
                f"paired differences). **tie**: the mean gap is under {TIE}; **win**: FSLoRA ahead on "
                "average and behind on no seed; **loss**: the reverse; **inconclusive**: the seeds disagree."
                if len(study.seeds) > 1 else
                f"One seed only: **ahead** / **behind** are single draws, not wins or losses (**tie**: a gap "
                f"under {TIE}). Add seeds to the study file for a verdict.")
        lines += ["", "## Where FSLoRA wins, ties or loses", "",
                  rule + " `fullrank` is left out (it breaks the budgets).",
                  "", *(f"- {v}" for v in verdicts)]
    if study.ablations:
        names = _plot_ablations(study, out, img)
        lines += ["", "## Ablations", ""]
        for a, name in zip(study.ablations, names):
            accs = [[final_accuracy(run_dir(variant_dir(out, a, v), a.method, s)) for s in study.seeds]
                    for v in a.variants]
            rows = [(a.x_label, *_accuracy_headers(study.seeds), "settings")]
            for v, acc in zip(a.variants, accs):
                rows.append((v.label, *_accuracy_cells(acc), "`" + " ".join(v.overrides) + "`"))
            lines += [f"### {a.title} (`{a.method}`, task `{a.task}`)", "", *_table(rows), "",
                      *([a.note, ""] if a.note else []), f"![{a.name}]({rel}/{name})", ""]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines).rstrip() + "\n")
    return report


def _task_section(study: Study, out: Path, task: str, img: Path) -> tuple[list[str], list[str]]:
    """One task's table and plots, and the verdict lines for the summary."""
    rel = img.relative_to(img.parent.parent).as_posix()
    verdicts: list[str] = []
    results = task_results(study, out, task)
    ours = next((r for r in results if r.method == "fslora"), None)
    plot_curves(task_dir(out, task), study.methods, study.seeds)  # redrawn from the runs, like the tables
    for png in ("accuracy_vs_round.png", "accuracy_vs_upload.png"):
        shutil.copyfile(task_dir(out, task) / png, img / f"{task}_{png}")
    paired = len(study.seeds) > 1
    rows = [("method", "lr", *_accuracy_headers(study.seeds), "upload MB / client / round",
             "FSLoRA − method, paired: mean ± std (verdict)" if paired else "FSLoRA − method")]
    for r in sorted(results, key=lambda r: -r.mean):
        cmp = ""
        if ours is not None and r is not ours:
            v = verdict(ours, r)
            gap = f"{v.mean:+.3f} ± {v.std:.3f}" if paired else f"{v.mean:+.3f}"
            cmp = f"{gap} ({v.word})"
            if r.method != "fullrank":
                verdicts.append(f"`{task}` vs `{r.method}`: **{v.word}** ({gap}; " + (
                    f"FSLoRA ahead on {v.won}, behind on {v.lost} of {len(r.accs)} seeds)" if paired
                    else f"seed {study.seeds[0]})"))
        rows.append((r.method, f"{r.lr:g}", *_accuracy_cells(r.accs), f"{r.upload_mb:.3g}", cmp))
    sums = [json.loads((run_dir(task_dir(out, task), m, s) / SUMMARY).read_text())
            for m in study.methods for s in study.seeds]
    n_test = json.loads((run_dir(task_dir(out, task), study.methods[0], study.seeds[0]) / "clients.json")
                        .read_text())["test_examples"]
    p = statistics.fmean(x["final_accuracy"] for x in sums)
    lines = ["", f"## Task `{task}`", "",
              f"Majority-class accuracy {statistics.fmean(x['majority_accuracy'] for x in sums):.3f}; "
              f"before any training {statistics.fmean(x['initial_accuracy'] for x in sums):.3f} "
              f"(means over seeds and methods). {_same_clients(study, out, task)} "
              f"Resolution: {n_test} held-out examples, so one example is worth {1 / n_test:.4f}, and an "
              f"accuracy near {p:.2f} has a sampling error of ±{math.sqrt(p * (1 - p) / n_test):.3f} "
              "(one standard error) on top of the spread between seeds.", "", *_table(rows), "",
              f"![accuracy vs round]({rel}/{task}_accuracy_vs_round.png) "
              f"![accuracy vs upload]({rel}/{task}_accuracy_vs_upload.png)"]
    return lines, verdicts


def _accuracy_headers(seeds: list[int]) -> list[str]:
    return ["accuracy mean ± std", *(f"seed {s}" for s in seeds)] if len(seeds) > 1 else [f"accuracy (seed {seeds[0]})"]


def _accuracy_cells(accs: list[float]) -> list[str]:
    """Mean ± std and every seed's value; one seed's value alone (a spread of one draw means nothing)."""
    if len(accs) == 1:
        return [f"{accs[0]:.3f}"]
    mean, std = mean_std(accs)
    return [f"{mean:.3f} ± {std:.3f}", *(f"{a:.3f}" for a in accs)]


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


def _sweep_section(study: Study, out: Path, lrs: dict[str, float]) -> list[str]:
    if study.sweep_task is None:
        rates = sorted({study.task_config(t).train.lr for t in study.tasks})
        return ["## Learning rates", "", "No sweep in this study: every method uses each task's configured "
                f"rate ({', '.join(f'{r:g}' for r in rates)})."]
    lines = [
        "## Learning rates: one sweep, the same for every method",
        "",
        f"Every method ran with each rate on task `{study.sweep_task}` with seed {study.sweep_seed}, which is "
        "not reported below: it draws its own client split and held-out sample (from the same pool, so "
        "some held-out examples can also be in the reported seeds' held-out sets). Each method keeps the "
        "rate with its best final accuracy (ties: the smaller rate) and uses it on every task and ablation.",
        "",
    ]
    grid = [("method", *(f"lr={lr:g}" for lr in study.lrs), "chosen")]
    edges = (min(study.lrs), max(study.lrs)) if len(study.lrs) > 1 else ()
    for m in study.methods:
        cells = []
        for lr in study.lrs:
            acc = final_accuracy(run_dir(sweep_dir(out, lr), m, study.sweep_seed))
            cells.append(f"**{acc:.3f}**" if lr == lrs[m] else f"{acc:.3f}")
        grid.append((m, *cells, f"{lrs[m]:g}" + (" (edge)" if lrs[m] in edges else "")))
    at_edge = [m for m in study.methods if lrs[m] in edges]
    note = (["", f"**(edge)**: {', '.join(f'`{m}`' for m in at_edge)} chose the smallest or largest rate of the "
             "grid, so a rate outside it may do better: widen `sweep.lrs` before reading much into "
             f"{'its' if len(at_edge) == 1 else 'their'} results."] if at_edge else [])
    return lines + _table(grid) + note


def _display(path: Path) -> str:
    try:
        return path.resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


def study_summary(study: Study, out: Path) -> dict:
    """Machine-readable digest of the main tables (what the report's tables show)."""
    return {task: {r.method: dataclasses.asdict(r) for r in task_results(study, out, task)}
            for task in study.tasks}
