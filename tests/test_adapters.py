"""PEFT round trip: the exported adapter loads with AutoPeftModelForCausalLM and gives the run's global
model; `fedlora export --merge` writes a full model that transformers loads; `model.init_adapter` starts
training from an adapter with the same function (rank padding, alpha conversion) and refuses what it cannot."""

import json

import pytest
import torch

from fedlora.cli import main
from fedlora.config import ConfigError, load_config
from fedlora.experiment import build_experiment
from fedlora.runner import run
from fedlora.simulate import simulate_round

from .conftest import tiny_overrides

peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")


def overrides(model_dir, data, out, **extra) -> list[str]:
    over = {"model.name": f'"{model_dir}"', "model.targets": '["q_proj", "v_proj", "down_proj"]',
            "model.max_length": 32, "data.name": f'"{data}"', "data.format": '"prompt-completion"',
            "data.num_clients": 3, "data.partition": '"iid"', "data.test_size": 8, "strategy.global_rank": 8,
            "budgets.ranks": "[2, 4, 8]", "train.local_steps": 3, "train.batch_size": 8, "train.lr": 3e-2,
            "federation.rounds": 2, "federation.eval_every": 1, "eval.generate_examples": 2,
            "eval.max_new_tokens": 3, "output_dir": f'"{out}"'}
    over.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in over.items()]


@pytest.fixture(scope="module")
def trained(tiny_chat_llama_dir, tmp_path_factory):
    """A finished 2-round run on the tiny chat Llama, and its experiment (holding the global state)."""
    tmp = tmp_path_factory.mktemp("adapters")
    data = tmp / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"count to {i % 5}", "completion": " ".join("abcde"[: i % 5 + 1])})
                            + "\n" for i in range(60)))
    cfg = load_config(None, overrides(tiny_chat_llama_dir, data, tmp / "run"))
    exp = build_experiment(cfg)
    run(cfg, simulate_round, progress=False, exp=exp)
    return cfg, exp, data


def global_logits(exp, ids):
    exp.lm.load(exp.server.global_task())
    exp.lm.model.eval()
    with torch.no_grad():
        return exp.lm.model(input_ids=ids).logits


def adapter_tensors(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_the_adapter_loads_with_auto_peft_and_merges_into_a_full_model(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, exp, _ = trained
    out = cfg.resolved_output_dir()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    ids = exp.data.encoded.input_ids[:4]
    ours = global_logits(exp, ids)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(out / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours, rtol=0, atol=1e-5)
    merged = tmp_path / "merged"
    assert main(["export", str(out), "--merge", str(merged)]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ours, rtol=0, atol=1e-4)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert AutoTokenizer.from_pretrained(str(merged)).chat_template  # the tokenizer comes along


def test_export_refuses_a_bad_run_dir_in_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere"), "--merge", str(tmp_path / "m")]) == 2
    assert main(["export", str(tmp_path), "--merge", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedlora: error: RUN_DIR: {tmp_path / 'nowhere'} is not a directory",
                   f"fedlora: error: RUN_DIR: {tmp_path} holds no exported adapter (adapter/adapter_config.json): "
                   "is it a finished fedlora run?"]


@pytest.mark.slow
def test_init_adapter_round_trip_at_lr_zero_gives_back_the_same_adapter(trained, tiny_chat_llama_dir, tmp_path):
    cfg, _, data = trained
    first = cfg.resolved_output_dir()
    again = tmp_path / "again"
    args = overrides(tiny_chat_llama_dir, data, again, model__init_adapter=f'"{first / "adapter"}"', train__lr=0,
                     federation__rounds=1)
    assert main(["run", *args, "--quiet"]) == 0
    a, b = adapter_tensors(first), adapter_tensors(again)
    assert a.keys() == b.keys() and any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=0)
    before = [json.loads(x) for x in (first / "metrics.jsonl").read_text().splitlines()][-1]
    after = [json.loads(x) for x in (again / "metrics.jsonl").read_text().splitlines()][0]
    assert after["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-6)


@pytest.mark.slow
def test_the_flower_server_starts_its_registered_strategy_from_init_adapter(trained, tiny_chat_llama_dir, tmp_path):
    # the ServerApp rebuilds the strategy for the budgets its nodes registered: it must keep the adapter
    pytest.importorskip("flwr")
    from types import SimpleNamespace

    from fedlora.flower.server_app import use_budgets

    cfg, exp, data = trained
    args = overrides(tiny_chat_llama_dir, data, tmp_path / "r",
                     model__init_adapter=f'"{cfg.resolved_output_dir() / "adapter"}"')
    started = build_experiment(load_config(None, args))
    ids = exp.data.encoded.input_ids[:4]
    expected = global_logits(started, ids)
    use_budgets(started, [8, 8, 4], SimpleNamespace(budgets=[8, 8, 4], num_examples=[5, 5, 5]))
    assert started.budgets == [8, 8, 4]
    torch.testing.assert_close(global_logits(started, ids), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(expected, global_logits(exp, ids), rtol=0, atol=1e-4)  # the trained run's model


@pytest.mark.slow
@pytest.mark.parametrize("method, rank, alpha, rslora", [("fslora", 16, 4.0, False), ("hetlora", 8, 32.0, True),
                                                         ("ffa", 8, 16.0, False), ("fedit", 8, 16.0, False)])
def test_init_adapter_keeps_the_function_under_another_rank_alpha_and_method(trained, tiny_chat_llama_dir, tmp_path,
                                                                             method, rank, alpha, rslora):
    cfg, exp, data = trained
    first = cfg.resolved_output_dir()
    args = overrides(tiny_chat_llama_dir, data, tmp_path / "r", model__init_adapter=f'"{first / "adapter"}"',
                     strategy__name=f'"{method}"', strategy__global_rank=rank, strategy__alpha=alpha,
                     strategy__rslora=str(rslora).lower(), budgets__ranks="[8, 8, 8]")
    started = build_experiment(load_config(None, args))
    ids = exp.data.encoded.input_ids[:4]
    ours = global_logits(exp, ids)
    assert ours.abs().max() > 10  # float32 rounding of logits this large (another summation order): ~1e-5
    torch.testing.assert_close(global_logits(started, ids), ours, rtol=1e-5, atol=5e-5)


def test_init_adapter_refusals_are_one_line(trained, tiny_chat_llama_dir, tmp_path):
    cfg, _, data = trained
    adapter = cfg.resolved_output_dir() / "adapter"

    def start(**extra):
        extra = {"model__init_adapter": f'"{adapter}"', **extra}
        build_experiment(load_config(None, overrides(tiny_chat_llama_dir, data, tmp_path / "r", **extra)))

    with pytest.raises(ConfigError, match=r"model.init_adapter: the adapter's rank 8 exceeds the rank of fslora's "
                                          r"global pair \(4\)"):
        start(strategy__global_rank=4, budgets__ranks="[2, 4]")
    with pytest.raises(ConfigError, match=r"model.init_adapter: flexlora keeps no single global pair to start from "
                                          r"\(methods that can: fslora, hetlora, fedit, ffa, fullrank, plora, fedex, "
                                          r"fslora-u\)"):
        start(strategy__name='"flexlora"')
    with pytest.raises(ConfigError, match=r"model.init_adapter: .* has no LoRA pair for model.layers.0.self_attn.k_pr"):
        start(model__targets='["q_proj", "k_proj", "v_proj", "down_proj"]')
    with pytest.raises(ConfigError, match=r"model.init_adapter: .* adapts modules this run does not"):
        start(model__targets='["q_proj", "v_proj"]')
    with pytest.raises(ConfigError, match=r"model.init_adapter: .*nowhere is not a PEFT adapter directory"):
        start(model__init_adapter=f'"{tmp_path / "nowhere"}"')


def test_a_classifier_exports_seq_cls_and_merges(tiny_bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, out, federation__rounds=1))
    exp = build_experiment(cfg)
    run(cfg, simulate_round, progress=False, exp=exp)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert main(["export", str(out), "--merge", str(tmp_path / "merged")]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    batch = exp.data.encoded.batch(exp.data.test[:6])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    exp.lm.load(exp.server.global_task())
    exp.lm.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, exp.lm.model(**inputs).logits, rtol=0, atol=1e-4)
