"""The FlowerTune track: LoRA targets chosen from the architecture, the four challenge configs
(valid offline; a stand-in of each runs), the byte budget, and `fedlora plan`'s traffic forecast."""

import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fedlora.cli import main
from fedlora.config import ConfigError, ModelConfig, default_config_path, load_config
from fedlora.lora import inject_lora
from fedlora.models import auto_targets, resolve_targets
from fedlora.plan import profile_model
from fedlora.plan_traffic import first_round_over, planned_traffic
from fedlora.runner import read_metrics, run
from fedlora.simulate import simulate_round
from fedlora.units import parse_bytes

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "flowertune"
# challenge -> (hub id, clients, fraction)
CHALLENGES = {"general_nlp": ("vicgalle/alpaca-gpt4", 20, 0.1), "finance": ("FinGPT/fingpt-sentiment-train", 50, 0.1),
              "medical": ("medalpaca/medical_meadow_medical_flashcards", 20, 0.1),
              "code": ("lucasmccabe-lmi/CodeAlpaca-20k", 10, 0.2)}


@pytest.mark.parametrize("fixture, task, expected", [
    ("tiny_gpt2_dir", "causal-lm", ["c_attn"]),
    ("tiny_llama_dir", "causal-lm", ["q_proj", "v_proj"]),
    ("tiny_bert_dir", "classification", ["query", "value"]),
])
def test_auto_targets_are_the_architectures(fixture, task, expected, request):
    cfg = ModelConfig(name=str(request.getfixturevalue(fixture)), task=task)
    assert cfg.targets == "auto"
    assert resolve_targets(cfg) == expected
    assert resolve_targets(ModelConfig(name=cfg.name, task=task, targets=["re:.*"])) == ["re:.*"]  # a list wins


class Block(nn.Module):
    def __init__(self, attention: str, mlp: str) -> None:
        super().__init__()
        self.attn = nn.ModuleDict({"q": nn.Linear(4, 4), attention: nn.Linear(4, 4)})
        self.mlp = nn.ModuleDict({mlp: nn.Linear(4, 4)})


def unknown_model(attention: str, mlp: str) -> nn.Module:
    model = nn.Sequential(Block(attention, mlp), Block(attention, mlp))
    model.config = SimpleNamespace(model_type="not-in-peft")
    return model


def test_without_peft_targets_every_attention_projection_is_adapted():
    model = unknown_model("out", "fc")
    targets, why = auto_targets(model)
    assert targets == ["out", "q"] and "attention" in why
    ambiguous = unknown_model("dense", "dense")  # a suffix that names an MLP layer too: a pattern instead
    (pattern,) = auto_targets(ambiguous)[0]
    assert sorted(inject_lora(ambiguous, [pattern])) == sorted(f"{b}.attn.{n}" for b in "01" for n in ("q", "dense"))
    bare = nn.Sequential(nn.Linear(2, 2))
    bare.config = SimpleNamespace(model_type="not-in-peft")
    with pytest.raises(ConfigError, match="model.targets"):
        auto_targets(bare)


def test_the_default_job_keeps_its_targets():
    cfg = load_config(default_config_path())  # names none, so that another model.name gets its own
    assert cfg.model.targets == "auto" and resolve_targets(cfg.model) == ["query", "value"]


def write_rows(path: Path, n: int = 24) -> Path:
    """A few rows in the challenges' columns (instruction, input, output)."""
    animals = ["cat", "dog", "cow", "hen"]
    rows = [{"instruction": f"which animal is number {i % 4}?", "input": "one word" if i % 2 else "",
             "output": f"the {animals[i % 4]}"} for i in range(n)]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def stand_in(model_dir: Path, data: Path, out: Path, **extra) -> list[str]:
    """Overrides that turn a FlowerTune config into a CPU run of seconds on the tiny Llama."""
    over = {"model.name": f'"{model_dir}"', "model.quantization": '"none"', "model.gradient_checkpointing": "false",
            "model.max_length": 40, "data.name": f'"{data}"', "data.num_clients": 4, "data.partition": '"iid"',
            "data.test_size": 4, "data.min_client_size": 2, "train.precision": '"fp32"', "train.device": '"cpu"',
            "train.local_steps": 1, "train.batch_size": 2, "federation.rounds": 2, "federation.eval_every": 2,
            "output_dir": f'"{out}"'}
    over.update(extra)
    return [f"{k}={v}" for k, v in over.items()]


def test_a_run_without_targets_records_the_architectures(tiny_chat_llama_dir, tmp_path, caplog):
    out = tmp_path / "run"
    args = stand_in(tiny_chat_llama_dir, write_rows(tmp_path / "rows.parquet"), out, **{"data.format": '"instruction"'})
    assert main(["run", *args, "--quiet"]) == 0
    assert "model.targets = auto: ['q_proj', 'v_proj']" in caplog.text
    assert load_config(out / "config.toml").model.targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize("name", CHALLENGES)
def test_flowertune_config_is_the_leaderboards_setting_with_unequal_budgets(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # validation reads no hub
    cfg = load_config(CONFIGS / f"{name}.toml")
    hub, clients, fraction = CHALLENGES[name]
    assert (cfg.data.name, cfg.data.num_clients, cfg.federation.fraction) == (hub, clients, fraction)
    assert cfg.data.format == "instruction" and set(cfg.data.columns) == {"instruction", "input", "output"}
    t = cfg.train
    assert (cfg.federation.rounds, t.local_steps, t.batch_size, cfg.model.max_length) == (200, 10, 16, 512)
    assert (t.lr_schedule, t.lr, t.min_lr) == ("cosine", 5e-5, 1e-6)
    assert (cfg.model.quantization, cfg.strategy.global_rank, cfg.strategy.alpha) == ("4bit", 32, 64.0)
    assert cfg.budgets.ranks == [8, 16, 32]
    assert parse_bytes(cfg.federation.max_total_bytes) == 200_000 * 2**20
    assert load_config(CONFIGS / f"{name}.toml", ["budgets.ranks=[32]"]).budgets.ranks == [32]  # equal budgets


@pytest.mark.parametrize("name", CHALLENGES)
def test_flowertune_stand_in_runs_two_rounds(name, tiny_chat_llama_dir, tmp_path):
    cfg = load_config(CONFIGS / f"{name}.toml",
                      stand_in(tiny_chat_llama_dir, write_rows(tmp_path / "rows.parquet"), tmp_path / "run"))
    summary = run(cfg, simulate_round, progress=False)
    assert summary["status"] == "finished" and summary["rounds_aggregated"] == 2
    assert cfg.model.targets == ["q_proj", "v_proj"]
    shares = [r["bytes_budget_share"] for r in read_metrics(tmp_path / "run")[1:]]
    assert 0 < shares[0] < shares[1] < 1e-3  # logged every round, a sliver of 200,000 MiB


def short_run(model_dir: Path, data: Path, out: Path, **extra) -> list[str]:
    """Four clients of budgets {2, 4, 8} of rank 8, two a round: rounds of unequal bytes."""
    return stand_in(model_dir, data, out, **{"data.format": '"instruction"', "strategy.global_rank": 8,
                                             "budgets.ranks": "[2, 4, 8]", "federation.fraction": 0.5, **extra})


def round_bytes(out: Path) -> list[float]:
    return [r["bytes_down"] + r["bytes_up"] for r in read_metrics(out) if r["round"] > 0]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_the_byte_budget_stops_before_the_round_that_would_pass_it(tiny_chat_llama_dir, tmp_path, capsys):
    data = write_rows(tmp_path / "rows.parquet")
    ref = tmp_path / "ref"
    assert main(["run", *short_run(tiny_chat_llama_dir, data, ref, **{"federation.rounds": 3}), "--quiet"]) == 0
    done = round_bytes(ref)
    assert done[0] != done[2]  # the rounds differ: the prediction must be the next round's own
    limit = int(done[0] + done[1] + done[2] / 2)
    out = tmp_path / "stopped"
    args = short_run(tiny_chat_llama_dir, data, out, **{"federation.rounds": 3, "federation.max_total_bytes": limit,
                                                        "federation.eval_every": 3})
    assert main(["run", *args, "--quiet"]) == 0  # a planned stop
    assert "federation.max_total_bytes" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "byte_budget_exhausted" and summary["rounds_aggregated"] == 2
    assert summary["bytes_used"] == done[0] + done[1] <= limit
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2] and "eval_loss" in rows[-1]  # the last round is evaluated
    assert rows[-1]["bytes_budget_share"] == pytest.approx((done[0] + done[1]) / limit)
    two = tmp_path / "two"  # the adapter is round 2's: the same as a run of 2 rounds
    assert main(["run", *short_run(tiny_chat_llama_dir, data, two), "--quiet"]) == 0
    got, want = adapter(out), adapter(two)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("method", ["fslora", "flora", "ffa"])  # fixed, growing (merged delta), A not uploaded
def test_plan_forecasts_the_measured_traffic(method, tiny_chat_llama_dir, tmp_path):
    out = tmp_path / method
    cfg = load_config(None, short_run(tiny_chat_llama_dir, write_rows(tmp_path / "rows.parquet"), out,
                                      **{"strategy.name": f'"{method}"', "federation.rounds": 3}))
    cfg.model.targets = resolve_targets(cfg.model)
    planned = [d + u for d, u in planned_traffic(cfg, method, profile_model(cfg.model).shapes)]
    run(cfg, simulate_round, progress=False)
    measured = round_bytes(out)
    assert sum(planned) == pytest.approx(sum(measured), rel=0.01)
    assert planned == measured  # exact, round by round
    if method == "flora":
        assert measured[0] < measured[2]  # the merged delta is sent and grows


def test_plan_prints_every_methods_total_against_the_budget(tiny_chat_llama_dir, tmp_path, capsys):
    args = short_run(tiny_chat_llama_dir, tmp_path / "unread.parquet", tmp_path / "x",
                     **{"federation.max_total_bytes": '"100kB"', "federation.rounds": 50})
    assert main(["plan", *args, "--methods", "fslora,fedit"]) == 0
    text = capsys.readouterr().out
    lines = {ln.split()[0]: ln.split() for ln in text.splitlines()[2:4]}
    assert set(lines) == {"fslora*", "fedit"}
    assert float(lines["fedit"][3]) < float(lines["fslora*"][3])  # FedIT sends the smallest rank
    cfg = load_config(None, args)
    cfg.model.targets = resolve_targets(cfg.model)
    rounds = planned_traffic(cfg, "fslora", profile_model(cfg.model).shapes)
    over = first_round_over(rounds, 10**5)
    assert sum(d + u for d, u in rounds[:over - 1]) <= 10**5 < sum(d + u for d, u in rounds[:over])
    assert over > 1 and lines["fslora*"][-1] == str(over)


@pytest.mark.parametrize("value", ["2 parsecs", -1, "GB"])
def test_a_bad_byte_budget_is_one_line(value, capsys):
    assert main(["run", f"federation.max_total_bytes={value}"]) == 2
    assert "federation.max_total_bytes" in capsys.readouterr().err
