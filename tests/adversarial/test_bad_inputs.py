"""Bad input files and contradictory settings: each is one line naming the file, line or key (exit 2
on the command line), never a traceback."""

import json

import numpy as np
import pytest
import torch

from fedlora.cli import main
from fedlora.config import ConfigError, DataConfig, load_config
from fedlora.data import load_dataset, load_text_dataset
from fedlora.experiment import build_experiment

from ..conftest import TinyRegressor
from ..test_data_sources import ALPACA, chat

datasets = pytest.importorskip("datasets")


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n', r"x.jsonl line 2 is not valid JSON"),
    ('{"prompt": "a", "completion": "b"}\n[1, 2]\n', r"x.jsonl line 2 is a JSON list, not an object"),
    ('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c"}\n',
     r"x.jsonl line 3 has no 'completion' \(its keys: prompt\)"),
    ('{"question": "a", "completion": "b"}\n', r"data.columns: .*needs a column 'prompt' and .*x.jsonl has none "
                                               r"\(columns: completion, question\)"),
])
def test_bad_jsonl_is_one_line_naming_the_line(tmp_path, text, message):
    path = tmp_path / "x.jsonl"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_dataset(chat(name=str(path), format="prompt-completion"))


def test_latin1_bytes_and_a_ragged_csv_are_one_line(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(b"text,label\ncaf\xe9,a\n")
    with pytest.raises(ConfigError, match=r"x.csv is not UTF-8 \(byte 0xe9 on line 2; latin-1\?\)"):
        load_text_dataset(DataConfig(name=str(path), label_column="label"))
    path.write_text("text,label\ngood,a,extra\n")
    with pytest.raises(ConfigError, match=r"x.csv line 2 has 3 fields, its header 2 \(text, label\)"):
        load_text_dataset(DataConfig(name=str(path), label_column="label"))


def test_labels_written_as_numbers_are_one_class_and_booleans_with_numbers_are_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"text": f"t{i}", "label": v} for i, v in enumerate([1, 1.0, "1", " 1 ", 0, "0.0"])]))
    ds = load_text_dataset(DataConfig(name=str(path), label_column="label"))
    assert ds.label_names == ["0", "1"] and ds.labels.tolist() == [1, 1, 1, 1, 0, 0]
    path.write_text(json.dumps([{"text": "a", "label": True}, {"text": "b", "label": "True"},
                                {"text": "c", "label": 0}]))
    with pytest.raises(ConfigError, match=r"data.label_column: column 'label' mixes booleans and numbers"):
        load_text_dataset(DataConfig(name=str(path), label_column="label"))
    path.write_text(json.dumps([{"text": "a", "label": "pos"}, {"text": "b", "label": "pos"}]))
    with pytest.raises(ConfigError, match=r"data.label_column: column 'label' of .* has one class only \('pos'\)"):
        load_text_dataset(DataConfig(name=str(path), label_column="label"))


def test_a_missing_column_is_one_line_on_the_command_line(tmp_path, capsys):
    path = tmp_path / "x.parquet"
    datasets.Dataset.from_list(ALPACA).to_parquet(str(path))
    code = main(["run", f'data.name="{path}"', 'data.format="instruction"', 'data.columns={output="answer"}',
                 f'output_dir="{tmp_path / "run"}"', "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("fedlora: error: data.columns.output: ")
    assert "data.columns.output" in err and "'answer'" in err and "instruction, output, task" in err


def test_dirichlet_on_conversations_needs_a_label_column(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    with pytest.raises(ConfigError, match=r"data.partition = \"dirichlet\" splits by class: data.label_column: "
                                          r"column 'sentiment' not in .*\(columns: input, instruction, output, task\)"):
        load_dataset(chat(name=str(path), partition="dirichlet"))
    ds = load_dataset(chat(name=str(path), partition="dirichlet", label_column="task"))
    assert ds.label_names == ["t0", "t1", "t2"] and np.bincount(ds.labels).tolist() == [10, 10, 10]


def test_format_and_task_agree_or_the_config_is_one_line(tmp_path):
    assert load_config(None, ['data.format="messages"']).model.task == "causal-lm"  # follows the format
    assert load_config(None, []).model.task == "classification"
    with pytest.raises(ConfigError, match=r"model.task: data.format = \"instruction\" trains a causal LM"):
        load_config(None, ['data.format="instruction"', 'model.task="classification"'])
    with pytest.raises(ConfigError, match=r"data.columns: \['text'\] are not fields of data.format = \"messages\""):
        load_config(None, ['data.format="messages"', 'data.columns={text="body"}'])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir: .*file is a file, not a directory"):
        load_config(None, [f'output_dir="{tmp_path / "file" / "run"}"'])


def test_a_csv_whose_texts_are_all_blank_is_one_line(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("text,sentiment\n,a\n  ,b\n")
    with pytest.raises(ConfigError, match=r"data.text_column: every row of .*x.csv has an empty 'text'"):
        load_text_dataset(DataConfig(name=str(path)))
    path.write_text("text,sentiment\nhello,a\n ,b\nbye,b\n")  # a blank row among others is dropped
    assert load_text_dataset(DataConfig(name=str(path))).texts == ["hello", "bye"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_nested_beyond_python_s_recursion_is_one_line_naming_the_line(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    deep = "[" * 100_000 + "]" * 100_000
    row = f'{{"prompt": {deep}, "completion": "c"}}'
    path.write_text(f'{{"prompt": "a", "completion": "b"}}\n{row}\n' if suffix == ".jsonl" else f"[{row}]")
    where = " line 2" if suffix == ".jsonl" else ""  # a JSON list: the file
    with pytest.raises(ConfigError, match=rf"data.name: .*x{suffix}{where} nests too deeply"):
        load_dataset(chat(name=str(path), format="prompt-completion"))


@pytest.mark.parametrize("override", ["train.lr=inf", "train.lr=nan", "privacy.dp_clip=inf", "privacy.clip_norm=inf",
                                      "data.alpha=inf", "strategy.alpha=-inf", "strategy.fslora.server_lr=nan"])
def test_infinite_and_nan_floats_are_refused_naming_the_key(override):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"^{key}: .*a finite number.*got {value}"):
        load_config(None, [override, "privacy.noise_multiplier=1.0"] if "dp_clip" in key else [override])


def test_infinite_dp_clip_on_the_command_line_exits_2(capsys):
    assert main(["run", "privacy.dp_clip=inf", "privacy.noise_multiplier=1.0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "privacy.dp_clip" in err and "Traceback" not in err


def small_adapter(tmp_path, head_bias: torch.Tensor, **config) -> tuple:
    """A PEFT adapter over TinyRegressor's ``up`` layer with ``down`` as its head, ``config`` patched in."""
    from fedlora.export import save_peft_adapter
    from fedlora.lora import LoRAModel
    from fedlora.types import ClientTask, Factors

    g = torch.Generator().manual_seed(0)
    task = ClientTask(factors={"up": Factors(A=torch.randn(2, 6, generator=g), B=torch.randn(5, 2, generator=g))},
                      scale=1.0, head={"down.weight": torch.ones(4, 5), "down.bias": head_bias})
    save_peft_adapter(task, tmp_path / "adapter", "tiny", alpha=4.0)
    conf = tmp_path / "adapter" / "adapter_config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), **config}))
    return tmp_path / "adapter", LoRAModel(TinyRegressor(), targets=["up"], head=["down.weight", "down.bias"])


@pytest.mark.parametrize("config, message", [
    ({"r": 0}, r"adapter_config.json: r = 0 must be a positive rank"),
    ({"r": "8"}, r"adapter_config.json: r = '8' must be a positive rank"),
    ({"lora_alpha": float("inf")}, r"adapter_config.json: lora_alpha = inf must be a finite number"),
])
def test_init_adapter_with_a_bad_rank_or_alpha_is_one_line(tmp_path, config, message):
    from fedlora.adapters import adapter_pairs

    path, lm = small_adapter(tmp_path, torch.zeros(4), **config)
    with pytest.raises(ConfigError, match=rf"model.init_adapter: .*{message}"):
        adapter_pairs(path, lm)


def test_init_adapter_with_a_head_of_the_wrong_shape_is_refused_naming_the_tensor(tmp_path):
    from fedlora.adapters import start_from_adapter
    from fedlora.methods import get_method
    from fedlora.strategies import build_strategy

    path, lm = small_adapter(tmp_path, torch.full((1,), 7.0))  # (1,) would broadcast over the (4,) bias
    strategy = build_strategy("fslora", lm.shapes(), [2, 4], seed=0, global_rank=4, alpha=4.0)
    before = lm.head_state()["down.bias"].clone()
    with pytest.raises(ConfigError, match=r"model.init_adapter: .*down.bias is \(1,\) there, \(4,\) in this model"):
        start_from_adapter(strategy, get_method("fslora"), str(path), lm)
    assert torch.equal(lm.head_state()["down.bias"], before)
    path, lm = small_adapter(tmp_path, torch.full((4,), 7.0))  # the right shape: loaded
    start_from_adapter(strategy, get_method("fslora"), str(path), lm)
    assert torch.equal(lm.head_state()["down.bias"], torch.full((4,), 7.0))


def test_a_budgets_file_above_the_global_rank_is_refused_as_the_config_s_budgets_are(tmp_path):
    from fedlora.budgets import client_budgets

    (tmp_path / "b.toml").write_text("budgets = [2, 16, 4]\n")
    over = [f'budgets.file="{tmp_path / "b.toml"}"', "data.num_clients=3", "strategy.global_rank=8"]
    with pytest.raises(ConfigError, match=r"budgets.file: .*b.toml: budgets \[16\] exceed the global rank "
                                          r"strategy.global_rank = 8"):
        cfg = load_config(None, over)
        client_budgets(cfg.budgets, 3, 0, cfg.strategy.global_rank)
    with pytest.raises(ConfigError, match=r"budgets.per_client: budgets \[16\] exceed the global rank"):
        load_config(None, ["budgets.per_client=[2, 16, 4]", "data.num_clients=3", "strategy.global_rank=8"])
    cfg = load_config(None, [*over[:2], "strategy.global_rank=16"])
    assert client_budgets(cfg.budgets, 3, 0, cfg.strategy.global_rank) == [2, 16, 4]


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_gpt2_dir"])
def test_max_length_beyond_a_learned_position_table_is_one_line(request, tmp_path, capsys, fixture):
    from ..conftest import tiny_overrides

    path = tmp_path / "long.csv"
    path.write_text("text,sentiment\n" + "".join(f"{' '.join(['word'] * 300)} {i},{'ab'[i % 2]}\n" for i in range(40)))
    causal = {"model__task": '"causal-lm"', "model__targets": '["c_attn"]'} if "gpt2" in fixture else {}
    args = tiny_overrides(request.getfixturevalue(fixture), tmp_path / "run", model__max_length=512,
                          data__name=f'"{path}"', data__test_size=8, data__max_examples=0, data__num_clients=2,
                          data__partition='"iid"', federation__rounds=1, **causal)
    assert main(["run", *args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "fedlora: error: model.max_length: 512 tokens exceed the 128 positions of the model")
    assert main(["run", *args, "model.max_length=128", "--quiet"]) == 0  # at the table's size: it runs


def test_a_4bit_sequence_classifier_keeps_its_head_out_of_quantisation_and_trains(tiny_bert_dir, tmp_path, capsys):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from ..conftest import tiny_overrides

    model_dir = tmp_path / "bert64"  # bitsandbytes' CPU kernels want layers at least 64 wide
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(model_dir)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=128)).save_pretrained(model_dir)
    out = tmp_path / "q"
    code = main(["run", *tiny_overrides(model_dir, out, model__quantization='"4bit"', federation__rounds=1),
                 "--quiet"])
    err = capsys.readouterr().err
    try:
        import bitsandbytes as bnb
    except ImportError:
        assert code == 2 and "model.quantization=4bit: needs bitsandbytes" in err and err.count("error") == 1
        return
    assert code == 0 and "Traceback" not in err, err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["train_loss"] > 0
    exp = build_experiment(load_config(out / "config.toml", [f'output_dir="{tmp_path / "again"}"']))
    model = exp.lm.model
    assert isinstance(exp.lm.layers["bert.encoder.layer.0.attention.self.query"].base, bnb.nn.Linear4bit)
    assert type(model.classifier) is torch.nn.Linear and model.classifier.weight.dtype == torch.float32
    assert exp.lm.head_names == ["classifier.bias", "classifier.weight"]
    from safetensors.torch import load_file

    trained = load_file(str(out / "adapter" / "adapter_model.safetensors"))["base_model.model.classifier.weight"]
    assert not torch.equal(trained, model.classifier.weight.detach())  # the head was trained (and exported)
