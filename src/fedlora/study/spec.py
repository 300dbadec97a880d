"""The study file (``configs/study/*.toml``) as dataclasses, read by the config loader.

The loader checks every key and type (``fedlora.config.from_dict``); :func:`load_study`
adds only what types cannot say: names and entries that repeat, methods the registry does
not know, tasks that are referenced but not declared, a sweep seed that is also reported,
ablation methods that the sweep gives no rate, and every task config (and ablation variant)
loading, all before any run starts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import RunConfig, from_dict, load_config, read_toml
from ..errors import ConfigError, check
from ..strategies import get_method
from .references import Reference


@dataclass(frozen=True)
class Task:
    name: str
    config: str  # its run config; load_study makes it relative to the working directory


@dataclass(frozen=True)
class Sweep:
    """On every task, every method (and reference) runs every rate with ``seed``, a seed that
    is not reported; each keeps, per task, the rate with its best final metric (accuracy, or the
    answer loss of a generative task: :mod:`fedlora.study.metric`)."""

    seed: int
    lrs: list[float]


@dataclass(frozen=True)
class Variant:
    label: str
    set: list[str]  # key=value overrides of the ablation's task config

    @property
    def overrides(self) -> list[str]:
        return self.set


@dataclass(frozen=True)
class Ablation:
    name: str
    title: str
    task: str
    methods: list[str]  # run and reported side by side; differences are against the first
    x_label: str
    variants: list[Variant]
    note: str = ""  # printed under the ablation's table (e.g. what else changes with x)


@dataclass(frozen=True)
class Study:
    """A study file: each field is one of its keys (``[[task]]``, ``[sweep]``, ``[[ablation]]``)."""

    methods: list[str]
    seeds: list[int]
    task: list[Task]
    sweep: Sweep | None = None  # None: no sweep, every method keeps each task's configured rate
    ablation: list[Ablation] = field(default_factory=list)
    reference: str = "fslora"  # the method the report compares every other one with ("ours" in the verdicts)
    references: list[Reference] = field(default_factory=list)  # reference lines: centralised, local
    path: str = ""  # the study file itself (set by load_study, not a key)

    @property
    def tasks(self) -> list[str]:
        return [t.name for t in self.task]

    def task_config(self, task: str, overrides: Sequence[str] = ()) -> RunConfig:
        config = next(t.config for t in self.task if t.name == task)
        return load_config(config, list(overrides), methods=set(self.methods))


def load_study(path: str | Path) -> Study:
    """Read and check a study file; task configs are resolved relative to it.

    Every mistake is a one-line ConfigError naming the file and key, raised before any run starts.
    """
    p = Path(path)
    data = read_toml(p, "study")
    try:
        check("path", "path" not in data, "not a study key (the study's path is where it is read from)")
        check("sweep.task", "task" not in data.get("sweep", {}),
              "every task now runs its own sweep: remove the key")
        _no_single_method(data.get("ablation"))
        study = from_dict(Study, data)
        _check(study)
    except ConfigError as e:
        raise ConfigError(f"{p.name}: {e}") from None
    tasks = []
    for i, t in enumerate(study.task):
        config = p.parent / t.config
        if not config.is_file():
            raise ConfigError(f"{p.name}: task[{i}].config: file not found: {config}")
        tasks.append(replace(t, config=str(config)))
    study = replace(study, task=tasks, path=str(p))
    for task in study.tasks:  # every config loads before hours of compute start
        study.task_config(task)
    for a in study.ablation:
        for v in a.variants:
            study.task_config(a.task, v.overrides)
    return study


def _check(study: Study) -> None:
    """What the types do not say; each failure names its key (the caller adds the file)."""
    check("task", bool(study.task), "needs at least one [[task]]")
    check("methods", bool(study.methods), "needs at least one method")
    check("seeds", bool(study.seeds), "needs at least one seed")
    _no_repeats(study.methods, "methods")
    _no_repeats(study.seeds, "seeds")
    _unique_names(study.tasks, "task")
    for i, m in enumerate(study.methods):
        get_method(m, f"methods[{i}]")
    check("reference", study.reference in study.methods,
          f"'{study.reference}' is not one of the methods ({', '.join(study.methods)})")
    referenced = []
    if study.sweep is not None:
        s = study.sweep
        _no_repeats(s.lrs, "sweep.lrs")
        check("sweep.lrs", bool(s.lrs) and all(lr > 0 for lr in s.lrs), f"needs positive learning rates, got {s.lrs}")
        check("sweep.seed", s.seed not in study.seeds,
              f"{s.seed} is also a reported seed; the sweep needs a seed that is not reported")
    _no_repeats(study.references, "references")
    _unique_names([a.name for a in study.ablation], "ablation")
    for i, a in enumerate(study.ablation):
        where = f"ablation[{i}]"
        _check_ablation_methods(study, a, where)
        check(f"{where}.variants", bool(a.variants), "needs at least one variant")
        _unique_names([v.label for v in a.variants], f"{where}.variants")
        for j, v in enumerate(a.variants):
            _no_repeats(v.set, f"{where}.variants[{j}].set")
        referenced.append((f"{where}.task", a.task))
    for key, task in referenced:
        check(key, task in study.tasks, f"unknown task '{task}' (tasks: {', '.join(study.tasks)})")


def _no_single_method(ablations: object) -> None:
    """An older study file's ``method = "x"`` in an ablation: say what to write instead."""
    for i, a in enumerate(ablations if isinstance(ablations, list) else []):
        if isinstance(a, dict) and "method" in a:
            raise ConfigError(f"ablation[{i}].method: an ablation now compares several methods: "
                              f"write methods = [{json.dumps(a['method'])}]")


def _check_ablation_methods(study: Study, a: Ablation, where: str) -> None:
    key = f"{where}.methods"
    check(key, bool(a.methods), "needs at least one method")
    _no_repeats(a.methods, key)
    for j, m in enumerate(a.methods):
        get_method(m, f"{key}[{j}]")
    # an ablation run takes its method's rate from the sweep, which runs only the study's methods
    outside = [m for m in a.methods if m not in study.methods]
    if study.sweep is not None and outside:
        raise ConfigError(f"{key}: '{outside[0]}' is not one of the study's methods ({', '.join(study.methods)}), "
                          "so the sweep gives it no rate: add it to methods")


def _no_repeats(values: list, key: str) -> None:
    check(key, len(set(values)) == len(values), f"repeated entries in {values}")


def _unique_names(names: list[str], key: str) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{key}: repeated name '{repeated[0]}'")
