"""Bad input files and contradictory settings: each is one line naming the file, line or key (exit 2
on the command line), never a traceback."""

import json

import numpy as np
import pytest

from fedlora.cli import main
from fedlora.config import ConfigError, DataConfig, load_config
from fedlora.data import load_dataset, load_text_dataset

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
