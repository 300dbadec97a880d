"""`fedlora study` on a generative task (a tiny Llama, prompt-completion data): the sweep keeps the rate
with the lowest answer loss, and the report's loss and Rouge-L, paired differences and traffic are the
numbers the run directories hold."""

import json
import math
import re
import statistics

import pytest
from scipy import stats as sps

from fedlora.cli import main
from fedlora.compare import run_dir
from fedlora.config import read_toml
from fedlora.errors import ConfigError
from fedlora.study.ablation_report import ablation_section
from fedlora.study.metric import ACCURACY, LOSS, best_rate
from fedlora.study.runner import chosen_lrs, sweep_dir, task_dir, variant_dir
from fedlora.study.spec import load_study

from .test_study import row_cells, total_mb_per_client_round

ANIMALS = ["cat", "dog", "owl", "fox", "bee", "eel"]

STUDY = """
methods = ["fslora", "fedit"]
seeds = [0, 1]
references = ["local"]

[[task]]
name = "lm"
config = "lm.toml"

[sweep]
seed = 7
lrs = [3e-2, 3e-1]

[[ablation]]
name = "budget"
title = "one budget for all"
task = "lm"
methods = ["fslora"]
x_label = "k"
variants = [{ label = "2", set = ["budgets.ranks=[2]"] }, { label = "8", set = ["budgets.ranks=[8]"] }]
"""

TASK = """
[model]
name = "{model}"
targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
max_length = 24

[data]
name = "{data}"
format = "prompt-completion"
num_clients = 3
partition = "iid"
test_size = 8

[strategy]
global_rank = 8

[budgets]
ranks = [2, 4, 8]

[train]
local_steps = 6
batch_size = 8
lr = 0.03

[federation]
rounds = 2
eval_every = 1

[eval]
generate_examples = 8
max_new_tokens = 3
batch_size = 4
"""


@pytest.fixture
def lm_study(tiny_chat_llama_dir, tmp_path):
    data = tmp_path / "animals.jsonl"
    rows = [{"prompt": f"which animal is number {i % 6}?", "completion": f"the {ANIMALS[i % 6]}"} for i in range(60)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "lm.toml").write_text(TASK.format(model=tiny_chat_llama_dir, data=data))
    (tmp_path / "study.toml").write_text(STUDY)
    return tmp_path / "study.toml"


def _summary(d) -> dict:
    return json.loads((d / "summary.json").read_text())


def _mean_se(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs) / math.sqrt(len(xs)):.3f}"


@pytest.mark.slow
def test_a_generative_study_ranks_by_answer_loss_and_reports_what_the_runs_hold(lm_study, tmp_path, capsys):
    out, report = tmp_path / "runs", tmp_path / "docs" / "lm.md"
    assert main(["study", str(lm_study), "--out", str(out), "--report", str(report), "--quiet"]) == 0
    capsys.readouterr()
    study, md = load_study(lm_study), report.read_text()
    lrs = chosen_lrs(study, out, "lm")

    # the sweep keeps each method's rate with the lowest final answer loss, without generating
    for m in study.methods:
        sweep = {lr: _summary(run_dir(sweep_dir(out, "lm", lr), m, 7)) for lr in study.sweep.lrs}
        losses = {lr: s["final_loss"] for lr, s in sweep.items()}
        assert lrs[m] == min(sorted(losses), key=losses.get), (m, losses)
        assert not any("final_rouge_l" in s for s in sweep.values())
        for seed in study.seeds:
            assert re.search(rf"^lr = {lrs[m]}$", (run_dir(task_dir(out, "lm"), m, seed) / "config.toml").read_text(),
                             re.M)

    section = md.split("## Task `lm`")[1].split("\n## ")[0]
    runs = {m: [run_dir(task_dir(out, "lm"), m, s) for s in study.seeds] for m in study.methods + ["local"]}
    sums = {m: [_summary(d) for d in dirs] for m, dirs in runs.items()}
    loss_col, rouge_col = "answer loss mean ± s.e.", "Rouge-L mean ± s.e."
    for m in study.methods:
        cells = row_cells(section, m)
        # mean ± standard error over the seeds, from the summaries
        assert cells[loss_col] == _mean_se([s["final_loss"] for s in sums[m]])
        assert cells[rouge_col] == _mean_se([s["final_rouge_l"] for s in sums[m]])
        # total traffic per client and round, from metrics.jsonl; more than the upload (the download counts)
        total = statistics.fmean(total_mb_per_client_round(d) for d in runs[m])
        assert float(cells["total MB (up + down) / client / round"]) == pytest.approx(total, rel=5e-3)
        assert float(cells["total MB (up + down) / client / round"]) > float(cells["upload MB / client / round"])
    local = row_cells(section, "*local* (reference)")
    assert local["lr"] == "0.03"  # the task's own rate: no centralised line was swept for it
    assert local[loss_col] == _mean_se([s["final_loss"] for s in sums["local"]])
    rows = [json.loads(x) for x in (runs["local"][0] / "metrics.jsonl").read_text().splitlines()]
    assert len(rows[-1]["client_rouge_l"]) == 3  # each client's own model, scored alone

    # fslora - fedit, paired over seeds: the mean of the per-seed differences and its t interval
    cells = row_cells(section, "fedit")
    for col, key in (("`fslora` − method, answer loss: mean [95% CI], Holm p → verdict", "final_loss"),
                     ("`fslora` − method, Rouge-L: mean [95% CI]", "final_rouge_l")):
        diffs = [a[key] - b[key] for a, b in zip(sums["fslora"], sums["fedit"])]
        half = sps.t.ppf(0.975, 1) * statistics.stdev(diffs) / math.sqrt(2)
        mean = statistics.fmean(diffs)
        assert cells[col].startswith(f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"), cells[col]
    word = re.search(r"^- `lm` vs `fedit` \(answer loss\): \*\*(win|loss|tie|inconclusive)\*\*", md, re.M)[1]
    lower = statistics.fmean(s["final_loss"] for s in sums["fslora"]) < statistics.fmean(
        s["final_loss"] for s in sums["fedit"])
    assert word not in ("win", "loss") or lower == (word == "win")  # a win is a lower loss
    assert "**lower is better**" in section and "The `local` line keeps the task's configured rate." in md
    assert f"greedy generations for {sums['fslora'][0]['generated_examples']} of those prompts" in section
    assert f"on {sums['fslora'][0]['test_examples']} held-out examples" in section
    assert "sampling error of ±" in section and "**Power:** paired over 2 seeds" in section
    assert "answer loss difference of **" in section and "For Rouge-L" in section

    # plots of answer loss and Rouge-L against round and upload; the ablation by loss
    for png in ("lm_loss_vs_round.png", "lm_loss_vs_upload.png", "lm_rouge_l_vs_round.png", "ablation_budget.png"):
        path = report.parent / "img" / "lm" / png
        assert path.stat().st_size > 1000 and f"img/lm/{png}" in md
    assert "| k | `fslora` answer loss mean ± std | settings |" in md  # one method: no difference column
    federation = read_toml(run_dir(out / "ablations" / "budget" / "2", "fslora", 0) / "config.toml")["federation"]
    assert federation["eval_every"] == federation["rounds"]  # the report reads only final values
    for table in re.findall(r"(?:^\|.*\|\n)+", md, re.M):  # every row has its header's columns
        assert len({line.count("|") for line in table.splitlines()}) == 1, table


def test_the_best_rate_is_the_lowest_loss_never_a_diverged_run():
    assert best_rate({1e-3: 2.0, 1e-2: 1.5, 1e-1: math.nan}, LOSS, "t") == 1e-2
    assert best_rate({1e-3: 2.0, 1e-2: 1.5, 1e-1: math.inf}, LOSS, "t") == 1e-2
    assert best_rate({1e-3: 0.6, 1e-2: 0.7, 1e-1: math.nan}, ACCURACY, "t") == 1e-2
    assert best_rate({3e-2: 1.5, 1e-2: 1.5}, LOSS, "t") == 1e-2  # a tie goes to the smaller rate
    with pytest.raises(ConfigError, match="t: every rate of the sweep diverged"):
        best_rate({1e-3: math.nan, 1e-2: math.inf}, LOSS, "t")


def test_the_sweep_never_keeps_a_run_that_diverged_or_trained_nothing(lm_study, tmp_path):
    study, out = load_study(lm_study), tmp_path / "runs"

    def finished(m: str, lr: float, loss: float, status: str = "finished") -> None:
        d = run_dir(sweep_dir(out, "lm", lr), m, 7)
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"final_loss": loss, "status": status}))  # NaN as JSON writes it

    finished("fslora", 3e-2, 2.0)
    finished("fslora", 3e-1, math.nan)
    finished("fedit", 3e-2, 3.0)
    finished("fedit", 3e-1, 1.0, "no_round_aggregated")  # every round skipped: the untrained model's loss
    assert chosen_lrs(study, out, "lm") == {"fslora": 3e-2, "fedit": 3e-2}
    (run_dir(sweep_dir(out, "lm", 3e-2), "fedit", 7) / "summary.json").write_text('{"final_loss": Infinity}')
    with pytest.raises(ConfigError, match="task lm, fedit: every rate of the sweep diverged"):
        chosen_lrs(study, out, "lm")


def test_a_generative_ablation_reports_each_methods_answer_loss_and_their_paired_difference(lm_study, tmp_path):
    lm_study.write_text(lm_study.read_text().replace('methods = ["fslora"]', 'methods = ["fslora", "fedit"]'))
    study, out, img = load_study(lm_study), tmp_path / "runs", tmp_path / "img"
    a = study.ablation[0]
    losses = {"fslora": [[2.0, 2.2], [1.5, 1.9]], "fedit": [[2.5, 2.4], [1.4, 1.6]]}  # per variant, per seed
    for m, per_variant in losses.items():
        for v, per_seed in zip(a.variants, per_variant):
            for seed, loss in zip(study.seeds, per_seed):
                d = run_dir(variant_dir(out, a, v), m, seed)
                d.mkdir(parents=True)
                (d / "summary.json").write_text(json.dumps({"final_loss": loss}))
    img.mkdir()
    md = "\n".join(ablation_section(study, out, a, img))
    assert md.startswith("### one budget for all (`fslora`, `fedit`; task `lm`)")
    for i, v in enumerate(a.variants):
        cells = row_cells(md, v.label)
        for m, per_variant in losses.items():
            xs = per_variant[i]
            assert cells[f"`{m}` answer loss mean ± std"] == f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"
        diffs = [b - f for f, b in zip(losses["fslora"][i], losses["fedit"][i])]  # method − first, still
        mean, half = statistics.fmean(diffs), sps.t.ppf(0.975, 1) * (statistics.stdev(diffs) / math.sqrt(2))
        assert cells["`fedit` − `fslora`: mean [95% CI]"] == f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"
    assert "lower answer loss is better, so a negative difference means the method did better" in md
    # power at the median spread of the two variants' paired differences (fedit − fslora: +0.5, +0.2; -0.1, -0.3)
    sd = statistics.median([statistics.stdev([0.5, 0.2]), statistics.stdev([-0.1, -0.3])])
    mdd = (sps.t.ppf(0.975, 1) + sps.t.ppf(0.8, 1)) * sd / math.sqrt(2)
    assert f"({sd:.3f}), a two-sided paired t test at α = 0.05 detects a true difference of {mdd:.3f}" in md
    assert (img / "ablation_budget.png").stat().st_size > 1000
