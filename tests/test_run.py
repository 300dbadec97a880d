"""End to end on a tiny BERT: outputs, determinism, and the exported PEFT adapter."""

import hashlib
import json

import pytest
import torch

from fedlora.cli import main
from fedlora.config import load_config
from fedlora.experiment import build_experiment
from fedlora.runner import run
from fedlora.simulate import simulate_round

from .conftest import tiny_overrides


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def strip_time(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r.pop("wall_time_s")
    return rows


def test_run_writes_outputs_and_is_deterministic(tiny_bert_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", *tiny_overrides(tiny_bert_dir, a), "--quiet"]) == 0
    assert main(["run", *tiny_overrides(tiny_bert_dir, b), "--quiet"]) == 0
    for name in ("config.toml", "clients.json", "metrics.jsonl", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json"):
        assert (a / name).is_file(), name
    rows = strip_time(a / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows[1:])
    assert {"train_loss", "eval_accuracy", "eval_loss", "rank_coverage"} <= set(rows[-1])
    diagnostics = {"fidelity", "effective_rank", "energy_top4", "energy_top8", "energy_top16", "energy_top32"}
    assert all(diagnostics <= set(r) and r["fidelity"] >= 0 for r in rows[1:])  # every round
    # same seed: identical metrics (all but wall time) and a byte-identical adapter
    assert rows == strip_time(b / "metrics.jsonl")
    assert sha(a / "adapter/adapter_model.safetensors") == sha(b / "adapter/adapter_model.safetensors")
    # the resolved config reproduces the run's settings
    cfg = load_config(a / "config.toml")
    assert cfg.strategy.global_rank == 8 and cfg.output_dir == str(a)


def test_different_seed_changes_the_result(tiny_bert_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    main(["run", *tiny_overrides(tiny_bert_dir, a, federation__rounds=1), "--quiet"])
    main(["run", *tiny_overrides(tiny_bert_dir, b, federation__rounds=1, seed=1), "--quiet"])
    assert sha(a / "adapter/adapter_model.safetensors") != sha(b / "adapter/adapter_model.safetensors")


def test_exported_adapter_loads_in_peft_with_identical_logits(tiny_bert_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, out))
    exp = build_experiment(cfg)
    run(cfg, simulate_round, progress=False, exp=exp)  # exp now holds the trained global state
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=3)
    peft_model = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    batch = exp.data.encoded.batch(exp.data.test[:8])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        exp.lm.load(exp.server.global_task())
        exp.lm.model.eval()
        ours = exp.lm.model(**inputs).logits
        theirs = peft_model(**inputs).logits
    assert exp.server.global_task().factors  # non-trivial adapter
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
