"""`fedlora study` on a tiny configuration: sweep, tasks x seeds, ablations, report, resume."""

import json
import math
import re
import statistics
from pathlib import Path

import pytest
from scipy import stats as sps

from fedlora.cli import main
from fedlora.compare import run_dir
from fedlora.config import ConfigError, read_toml
from fedlora.strategies import METHODS
from fedlora.study.metric import ACCURACY, LOSS
from fedlora.study.report import method_lines
from fedlora.study.runner import chosen_lrs, final_only, sweep_dir, task_dir, task_metric, variant_dir
from fedlora.study.spec import Study, load_study

from .conftest import tiny_overrides

STUDY = """
methods = ["fslora", "flexlora", "fedit"]
seeds = [0, 1]
references = ["centralised", "local"]

[[task]]
name = "alpha"
config = "tiny.toml"

[[task]]
name = "beta"
config = "tiny_iid.toml"

[sweep]
seed = 7
lrs = [1e-2, 5e-2]

[[ablation]]
name = "ratio"
title = "k of r = 8"
task = "alpha"
methods = ["fslora", "fedit"]
x_label = "k"
variants = [{ label = "2", set = ["budgets.ranks=[2]"] }, { label = "8", set = ["budgets.ranks=[8]"] }]
"""


def row_cells(section: str, first: str) -> dict[str, str]:
    """The cells of the Markdown table row of ``section`` whose first cell is ``first``, by column header."""
    table = next(t for t in re.findall(r"(?:^\|.*\|\n)+", section + "\n", re.M) if f"\n| {first} |" in t)
    head, _, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]
    return dict(zip(head, next(r for r in rows if r[0] == first)))


def total_mb_per_client_round(run: Path) -> float:
    """(sum of bytes_up + bytes_down) / clients / rounds from a run's metrics.jsonl, in MB (same clients each round)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r.get("clients")]
    assert len({r["clients"] for r in rounds}) == 1  # else the per-round mean differs from this formula
    return sum(r["bytes_up"] + r["bytes_down"] for r in rounds) / rounds[0]["clients"] / len(rounds) / 1e6


def assert_ablation_table_holds_the_runs(study: Study, out: Path, md: str) -> None:
    """The ablation's table: each method's mean ± std and fedit − fslora paired over the seeds (mean and its
    t interval), recomputed from the runs' summary.json; every run evaluated only after its last round."""
    a = study.ablation[0]
    section = md.split("### k of r = 8 (`fslora`, `fedit`; task `alpha`)")[1].split("\n## ")[0]
    for v in a.variants:
        runs = {m: [run_dir(variant_dir(out, a, v), m, s) for s in study.seeds] for m in a.methods}
        accs = {m: [json.loads((d / "summary.json").read_text())["final_accuracy"] for d in ds]
                for m, ds in runs.items()}
        cells = row_cells(section, v.label)
        for m, xs in accs.items():
            assert cells[f"`{m}` accuracy mean ± std"] == f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"
        diffs = [b - f for f, b in zip(accs["fslora"], accs["fedit"])]
        mean, half = statistics.fmean(diffs), sps.t.ppf(0.975, 1) * (statistics.stdev(diffs) / math.sqrt(2))
        assert cells["`fedit` − `fslora`: mean [95% CI]"] == f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"
        assert cells["settings"] == f"`{' '.join(v.set)}`"
        for d in runs["fslora"] + runs["fedit"]:
            federation = read_toml(d / "config.toml")["federation"]
            assert federation["eval_every"] == federation["rounds"] == 2  # the report reads only final values
    assert "Differences: method − `fslora`, paired seed by seed, with the 95% t interval" in section


def _toml(overrides: list[str]) -> str:
    """key=value overrides as a TOML document (tables from dotted keys)."""
    tables: dict[str, list[str]] = {}
    top = []
    for o in overrides:
        key, value = o.split("=", 1)
        if key == "output_dir":
            continue
        if "." in key:
            t, k = key.split(".", 1)
            tables.setdefault(t, []).append(f"{k} = {value}")
        else:
            top.append(f"{key} = {value}")
    return "\n".join(top + [f"[{t}]\n" + "\n".join(v) for t, v in tables.items()]) + "\n"


@pytest.fixture
def tiny_study(tiny_bert_dir, tmp_path):
    base = tiny_overrides(tiny_bert_dir, tmp_path / "unused", federation__rounds=2, federation__eval_every=1)
    (tmp_path / "tiny.toml").write_text(_toml(base))
    (tmp_path / "tiny_iid.toml").write_text(_toml(base + ['data.partition="iid"']))
    (tmp_path / "study.toml").write_text(STUDY)
    return tmp_path / "study.toml"


@pytest.mark.slow
def test_study_runs_everything_and_writes_a_well_formed_report(tiny_study, tmp_path, capsys):
    out, report = tmp_path / "runs", tmp_path / "docs" / "results.md"
    args = ["study", str(tiny_study), "--out", str(out), "--report", str(report), "--quiet"]
    assert main(args) == 0
    study = load_study(tiny_study)
    md = report.read_text()
    entries = study.methods + study.references

    for task in study.tasks:
        # each task's own sweep picks each method's (and reference's) rate, and the task's runs use it
        lrs = chosen_lrs(study, out, task)
        assert lrs["local"] == lrs["centralised"]  # local-only is not swept: it takes the centralised rate
        for m in study.methods + ["centralised"]:
            accs = {lr: json.loads((run_dir(sweep_dir(out, task, lr), m, 7) / "summary.json").read_text())
                    ["final_accuracy"] for lr in study.sweep.lrs}
            assert accs[lrs[m]] == max(accs.values())
        for m in entries:
            for seed in study.seeds:
                cfg = (run_dir(task_dir(out, task), m, seed) / "config.toml").read_text()
                assert re.search(rf"^lr = {lrs[m]}$", cfg, re.M), (m, task, seed)
        # one table row per method and reference line, its mean the mean of its runs' summaries
        section = md.split(f"## Task `{task}`")[1].split("\n## ")[0]
        for m in entries:
            label = m if m in study.methods else f"*{m}* (reference)"
            row = next(line for line in section.splitlines() if line.startswith(f"| {label} | {lrs[m]:g} |"))
            accs = [json.loads((run_dir(task_dir(out, task), m, seed) / "summary.json").read_text())["final_accuracy"]
                    for seed in study.seeds]
            assert f"{sum(accs) / len(accs):.3f} ± " in row
        assert "**Power:** paired over 2 seeds" in section and "**Run length:** the best method here" in section
        assert re.search(r"accuracy at [0-9.e+-]+ MB up", section)
    # the centralised line is one client for all the federation's steps; local-only trains every client alone
    central = (run_dir(task_dir(out, "alpha"), "centralised", 0) / "config.toml").read_text()
    assert "num_clients = 1" in central and "local_steps = 12" in central  # 2 rounds x 3 clients x 2 steps
    local = [json.loads(x) for x in (run_dir(task_dir(out, "alpha"), "local", 0) / "metrics.jsonl").read_text()
             .splitlines()]
    assert len(local[-1]["client_accuracy"]) == 4 and local[-1]["bytes_up"] == 0
    assert "## Where `fslora` wins, ties or loses" in md
    # with two rates every choice is at an edge of the grid: the report says the grid may be too narrow
    assert md.count(" (edge) |") == 2 * (len(entries) - 1)
    assert md.count("`alpha` vs `") == 2 and md.count("`beta` vs `") == 2
    assert_ablation_table_holds_the_runs(study, out, md)
    for png in ["alpha_accuracy_vs_round.png", "beta_accuracy_vs_upload.png", "ablation_ratio.png"]:
        path = report.parent / "img" / "results" / png
        assert path.stat().st_size > 1000 and f"img/results/{png}" in md
    # sweeps 2 tasks x 2 rates x 4 lines + tasks 2 x 2 seeds x 5 lines + ablation 2 variants x 2 seeds x 2 methods
    assert "**Cost:** 44 runs" in md
    for table in re.findall(r"(?:^\|.*\|\n)+", md, re.M):  # every row has its header's columns
        widths = {line.count("|") for line in table.splitlines()}
        assert len(widths) == 1, table
    capsys.readouterr()

    assert md.count("every method had the same client split and budgets (3 identical `clients.json`") == 2

    # resume: nothing reruns, the report regenerates identically
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")} == stamps
    assert report.read_text() == md and "## Where rank matters" not in md
    capsys.readouterr()
    (report.parent / "rank_recovery.md").write_text("# rank recovery\n")  # beside the report: linked
    assert main([*args, "--report-only"]) == 0
    assert "[rank_recovery.md](rank_recovery.md)" in report.read_text()
    capsys.readouterr()

    # a run that saw another split is refused, not tabled
    clients = run_dir(task_dir(out, "beta"), "fedit", 1) / "clients.json"
    info = json.loads(clients.read_text())
    clients.write_text(json.dumps({**info, "split_sha256": "0" * 64}))
    assert main([*args, "--report-only"]) == 2
    err = capsys.readouterr().err
    assert "task beta, seed 1: fedit ran on another split or budgets than fslora" in err and err.count("\n") == 1


def test_runs_are_deterministic_per_seed(tiny_study, tmp_path):
    study = load_study(tiny_study)
    from fedlora.compare import compare

    for out in (tmp_path / "a", tmp_path / "b"):
        compare(study.task_config("alpha"), ["fslora"], [1], out, progress=False)
    metrics = [(tmp_path / d / "fslora-seed1" / "metrics.jsonl").read_text() for d in "ab"]
    strip = [re.sub(r'"wall_time_s": [0-9.e-]+', "", m) for m in metrics]
    assert strip[0] == strip[1]


def test_a_finished_run_of_another_setup_is_not_mixed_in(tiny_study, tmp_path, capsys):
    study = load_study(tiny_study)
    from fedlora.compare import compare

    out = tmp_path / "c"
    compare(study.task_config("alpha"), ["fedit"], [0], out, progress=False)
    with pytest.raises(ConfigError, match=r"different train\.lr \(0\.001 there, 0\.5 now\)"):
        compare(study.task_config("alpha", ["train.lr=0.5"]), ["fedit"], [0], out, progress=False)


@pytest.mark.parametrize("edit, message", [
    (('seed = 7', 'seed = 1'), "sweep.seed: 1 is also a reported seed"),
    (('seeds = [0, 1]', 'seeds = [0, "1"]'), "study.toml: seeds[1]: expected int, got '1'"),
    (('seeds = [0, 1]', 'seeds = [0, 0]'), "study.toml: seeds: repeated entries in [0, 0]"),
    (('lrs = [1e-2, 5e-2]', 'lrs = []'), "study.toml: sweep.lrs: needs positive learning rates"),
    (('lrs = [1e-2, 5e-2]', 'lrs = [1e-2, 0]'), "study.toml: sweep.lrs: needs positive learning rates"),
    (('"fslora", "fedit"]', '"fslora", "nope"]'), "study.toml: ablation[0].methods[1]: unknown method 'nope'"),
    (('"fslora", "fedit"]', '"fslora", "ffa"]'),
     "study.toml: ablation[0].methods: 'ffa' is not one of the study's methods (fslora, flexlora, fedit), so the "
     "sweep gives it no rate"),
    (('"fslora", "fedit"]', '"fslora", "fslora"]'),
     "study.toml: ablation[0].methods: repeated entries in ['fslora', 'fslora']"),
    (('["fslora", "fedit"]', '[]'), "study.toml: ablation[0].methods: needs at least one method"),
    (('methods = ["fslora", "fedit"]', 'method = "fslora"'),
     'study.toml: ablation[0].method: an ablation now compares several methods: write methods = ["fslora"]'),
    (('{ label = "8"', '{ label = "2"'), "study.toml: ablation[0].variants: repeated name '2'"),
    (('"flexlora", "fedit"]', '"flexlora", "nope"]'), "study.toml: methods[2]: unknown method 'nope'"),
    (('"flexlora", "fedit"]', '"flexlora", "fedit"]\nreference = "ffa"'),
     "study.toml: reference: 'ffa' is not one of the methods"),
    (('name = "beta"', 'name = "alpha"'), "study.toml: task: repeated name 'alpha'"),
    (('seed = 7', 'seed = 7.5'), "study.toml: sweep.seed: expected int, got 7.5"),
    (('config = "tiny_iid.toml"\n', ''), "study.toml: missing config key 'task[1].config'"),
    (('[sweep]', '[sweep]\nlr = 1'), "study.toml: unknown config key 'sweep.lr'"),
    (('methods = [', 'path = "x"\nmethods = ['), "study.toml: path: not a study key"),
    (('config = "tiny.toml"', 'config = "missing.toml"'), "study.toml: task[0].config: file not found"),
    (('[sweep]', '[sweep]\ntask = "alpha"'), "study.toml: sweep.task: every task now runs its own sweep"),
    (('references = ["centralised", "local"]', 'references = ["global"]'),
     "study.toml: references[0]: must be one of centralised, local; got 'global'"),
    (('task = "alpha"\nmethod', 'task = "gamma"\nmethod'), "study.toml: ablation[0].task: unknown task 'gamma'"),
    (('x_label = "k"', 'x_label = "k"\ncolour = 1'), "study.toml: unknown config key 'ablation[0].colour'"),
    (('budgets.ranks=[2]', 'budgets.nope=[2]'), "unknown config key 'budgets.nope'"),
])
def test_bad_study_files_exit_2_with_one_line(tiny_study, tmp_path, capsys, edit, message):
    tiny_study.write_text(tiny_study.read_text().replace(*edit))
    assert main(["study", str(tiny_study), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_sweeps_and_ablations_evaluate_only_after_the_last_round(tiny_study):
    study = load_study(tiny_study)
    a = study.ablation[0]
    assert study.task_config("alpha").federation.eval_every == 1  # the task's own runs keep their curve
    cfg = final_only(study, a.task, [*a.variants[0].overrides, "federation.rounds=5"])
    assert cfg.federation.eval_every == cfg.federation.rounds == 5 and cfg.budgets.ranks == [2]


def test_the_reference_method_comes_from_the_study_file(tiny_study):
    assert load_study(tiny_study).reference == "fslora"  # the default
    tiny_study.write_text(tiny_study.read_text().replace("seeds = [0, 1]", 'seeds = [0, 1]\nreference = "fedit"'))
    study = load_study(tiny_study)
    assert study.reference == "fedit" and study.sweep.lrs == [1e-2, 5e-2] and study.ablation[0].variants[1].label == "8"


def test_the_report_describes_each_method_from_the_registry():
    lines = method_lines(Study(methods=["fslora", "fullrank"], seeds=[0], task=[]))
    assert lines[:2] == [f"- `fslora`: {METHODS['fslora'].summary}", f"- `fullrank`: {METHODS['fullrank'].summary}"]
    # the budget-breaking reference is named from the registry's respects_budgets, and only it
    assert [line for line in lines if "ignores the clients' rank budgets" in line] == [
        "\n`fullrank` ignores the clients' rank budgets: a reference that breaks them, not a competitor "
        "(nor always the best)."]


def test_a_study_without_a_sweep_keeps_each_tasks_rate(tiny_study, tmp_path, capsys):
    text = tiny_study.read_text()
    no_sweep = text[:text.index("[sweep]")].replace("seeds = [0, 1]", "seeds = [3]")
    no_sweep = no_sweep.replace('"flexlora", "fedit"', '"ffa"')
    tiny_study.write_text(no_sweep)
    out, report = tmp_path / "runs", tmp_path / "report.md"
    assert main(["study", str(tiny_study), "--out", str(out), "--report", str(report), "--quiet"]) == 0
    md = report.read_text()
    assert "No sweep in this study" in md and "## Ablations" not in md
    # one seed: no spreads (a std of one draw is meaningless), single-draw words, the test set's resolution
    section = md.split("## Task `alpha`")[1].split("\n## ")[0]
    assert not [line for line in section.splitlines() if line.startswith(("| fslora", "| ffa")) and "±" in line]
    verdict_line = next(line for line in md.splitlines() if line.startswith("- `alpha` vs `ffa`"))
    assert "[" not in verdict_line and re.search(r"\*\*one seed: (ahead|behind)\*\* \([+-]\d\.\d{3};", verdict_line)
    assert re.search(r"Resolution: 60 held-out examples, so one example is worth 0\.0167", md)
    task_lr = load_study(tiny_study).task_config("alpha").train.lr
    for m in ("fslora", "ffa"):
        cfg = (run_dir(task_dir(out, "alpha"), m, 3) / "config.toml").read_text()
        assert re.search(rf"^lr = {task_lr}$", cfg, re.M)
        assert f"| {m} | {task_lr:g} |" in md
    # the total traffic (up + down) per client and round, from the run's metrics.jsonl (one seed here)
    header = "total MB (up + down) / client / round"
    for m in ("fslora", "ffa"):
        cells = row_cells(section, m)
        expected = total_mb_per_client_round(run_dir(task_dir(out, "alpha"), m, 3))
        assert float(cells[header]) == pytest.approx(expected, rel=5e-3)
        assert float(cells[header]) > float(cells["upload MB / client / round"])  # the download is counted
    assert row_cells(section, "*centralised* (reference)")[header] == ""


def test_report_only_names_the_missing_runs(tiny_study, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["study", str(tiny_study), "--out", str(out), "--report-only", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "44 of the study's runs are not finished" in err and "fslora-seed7" in err and err.count("\n") == 1


def test_compare_resumes_an_interrupted_run_from_its_checkpoint(tiny_study, tmp_path, monkeypatch):
    from fedlora import simulate
    from fedlora.compare import compare

    cfg = load_study(tiny_study).task_config("alpha")  # checkpoints every round (the default)
    out = tmp_path / "c"
    real_train = simulate.train_client

    def dies_in_round_2(exp, rnd, cid, task):
        if rnd == 2:
            raise KeyboardInterrupt  # what Ctrl-C does mid-round
        return real_train(exp, rnd, cid, task)

    monkeypatch.setattr(simulate, "train_client", dies_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        compare(cfg, ["fslora"], [0], out, progress=False)
    d = run_dir(out, "fslora", 0)
    assert not (d / "summary.json").exists() and (d / "checkpoints").is_dir()
    monkeypatch.undo()

    compare(cfg, ["fslora"], [0], out, progress=False)
    rounds = [json.loads(x)["round"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2] and (d / "summary.json").exists()

    fresh = tmp_path / "fresh"
    compare(cfg, ["fslora"], [0], fresh, progress=False)
    strip = [re.sub(r'"wall_time_s": [0-9.e-]+', "", (o / "fslora-seed0" / "metrics.jsonl").read_text())
             for o in (out, fresh)]
    assert strip[0] == strip[1]  # the resumed run is the run that was not interrupted


def test_a_generative_task_is_accepted_and_ranked_by_its_answer_loss(tiny_study, tmp_path):
    iid = tmp_path / "tiny_iid.toml"
    iid.write_text(iid.read_text().replace("[data]\n", '[data]\nformat = "instruction"\n', 1))
    study = load_study(tiny_study)  # a generative task is no longer refused
    assert task_metric(study, "beta") == LOSS and task_metric(study, "alpha") == ACCURACY


def test_the_study_clock_counts_an_invocation_killed_after_its_last_finished_run(tmp_path):
    from fedlora.study.runner import StudyClock, read_timing

    killed = StudyClock(tmp_path)
    killed.jobs = 2
    killed.finished(None)
    killed.finished(None)  # ... then SIGKILL: close() never runs
    t = read_timing(tmp_path)
    assert (t["runs"], t["invocations"], t["max_jobs"]) == (2, 1, 2) and t["elapsed_s"] > 0
    idle = StudyClock(tmp_path)
    idle.close()  # finished nothing: not an invocation that did work
    assert read_timing(tmp_path)["invocations"] == 1
    later = StudyClock(tmp_path)
    later.finished(None)
    before = read_timing(tmp_path)
    later.close()  # an interrupted run's partial time after the last finished one
    after = read_timing(tmp_path)
    assert (after["runs"], after["invocations"], after["max_jobs"]) == (3, 2, 2)
    assert after["elapsed_s"] >= before["elapsed_s"] > 0


def test_the_cost_line_says_when_recorded_wall_time_is_short_of_the_runs():
    from fedlora.study.report import cost_line

    honest = cost_line(4, 600.0, {"elapsed_s": 330.0, "invocations": 1, "max_jobs": 2})
    assert honest.startswith("**Cost:** 4 runs, 10.0 min of run time; the invocation") and "missing" not in honest
    assert "up to 2 runs at a time" in honest
    short = cost_line(30, 145 * 60.0, {"elapsed_s": 110 * 60.0, "invocations": 3})  # one job: wall >= run time
    assert "3 invocations" in short and "is missing)" in short
    assert cost_line(2, 60.0, None) == "**Cost:** 2 runs, 1.0 min of run time"
