"""Loading data: the formats, 🤗 datasets paths (parquet, csv, a saved DatasetDict with its own test
split, subset/split keys of a local data folder), and every bad input as one line naming it."""

import json

import numpy as np
import pytest

from fedlora.cli import main
from fedlora.config import ConfigError, DataConfig, load_config
from fedlora.data import ChatDataset, load_dataset, load_text_dataset, split_clients, subsample

datasets = pytest.importorskip("datasets")

ALPACA = [{"instruction": f"name animal {i}", "input": "in one word" if i % 2 else "", "output": f"cat {i}",
           "task": f"t{i % 3}"} for i in range(30)]


def chat(**kw) -> DataConfig:
    cfg = DataConfig(**{"format": "instruction", "partition": "iid", "test_size": 5, **kw})
    cfg.validate()
    return cfg


def test_instruction_rows_join_instruction_and_input_alpaca_style(tmp_path):
    path = tmp_path / "alpaca.parquet"
    datasets.Dataset.from_list(ALPACA).to_parquet(str(path))
    ds = load_dataset(chat(name=str(path)))
    assert isinstance(ds, ChatDataset) and len(ds.conversations) == 30 and ds.held_out is None
    assert ds.conversations[0] == [{"role": "user", "content": "name animal 0"},
                                   {"role": "assistant", "content": "cat 0"}]
    assert ds.conversations[1][0]["content"] == "name animal 1\n\nin one word"


def test_columns_rename_fields_and_csv_reads_through_its_byte_order_mark(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_bytes("\ufeffquestion,answer\nwhat is up?,the sky\nand down?,\"the ground, mostly\"\n".encode())
    ds = load_dataset(chat(name=str(path), format="prompt-completion",
                           columns={"prompt": "question", "completion": "answer"}))
    assert ds.conversations[1] == [{"role": "user", "content": "and down?"},
                                   {"role": "assistant", "content": "the ground, mostly"}]


def test_a_saved_dataset_dict_gives_its_own_test_split_as_the_held_out_set(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(40)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:32]),
                          "test": datasets.Dataset.from_list(rows[32:])}).save_to_disk(str(tmp_path / "saved"))
    cfg = chat(name=str(tmp_path / "saved"), format="prompt-completion", test_size=600, num_clients=4)
    ds = subsample(load_dataset(cfg), 20, seed=0)  # max_examples caps training rows; test rows are all kept
    clients, test = split_clients(ds, cfg, seed=0)
    held = [ds.conversations[i][0]["content"] for i in test]
    assert held == [f"p{i}" for i in range(32, 40)]
    assert sum(len(c) for c in clients) == 20
    assert not {ds.conversations[i][0]["content"] for c in clients for i in c} & set(held)
    # test_split = "none" holds rows out of the training split as usual; a missing split is one line
    cfg = chat(name=str(tmp_path / "saved"), format="prompt-completion", test_split="none")
    assert load_dataset(cfg).held_out is None
    with pytest.raises(ConfigError, match=r"data.test_split: .* has no split 'dev' \(its splits: test, train\)"):
        load_dataset(chat(name=str(tmp_path / "saved"), format="prompt-completion", test_split="dev"))
    with pytest.raises(ConfigError, match=r"data.split: .* has no split 'validation' \(its splits: test, train\)"):
        load_dataset(chat(name=str(tmp_path / "saved"), format="prompt-completion", split="validation"))


def test_subset_and_split_keys_of_a_local_data_folder(tmp_path):
    folder = tmp_path / "multi"
    for subset, n in (("en", 12), ("fr", 7)):
        (folder / subset).mkdir(parents=True)
        rows = [{"prompt": f"{subset}{i}", "completion": "x"} for i in range(n)]
        datasets.Dataset.from_list(rows).to_parquet(str(folder / subset / "train.parquet"))
        datasets.Dataset.from_list(rows[:3]).to_parquet(str(folder / subset / "valid.parquet"))
    configs = "".join(f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train.parquet\n"
                      f"  - split: valid\n    path: {s}/valid.parquet\n" for s in ("en", "fr"))
    (folder / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    ds = load_dataset(chat(name=str(folder), format="prompt-completion", subset="fr"))
    assert [c[0]["content"] for c in ds.conversations] == [f"fr{i}" for i in range(7)]
    ds = load_dataset(chat(name=str(folder), format="prompt-completion", subset="en", split="valid"))
    assert len(ds.conversations) == 3
    with pytest.raises(ConfigError, match=r"data.subset: .*cannot load.*'de'"):
        load_dataset(chat(name=str(folder), format="prompt-completion", subset="de"))


def test_messages_rows_and_group_partition_one_task_per_client(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}],
             "task": f"t{i % 3}"} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = chat(name=str(path), format="messages", partition="group", group_column="task", num_clients=3, test_size=6)
    ds = load_dataset(cfg)
    clients, test = split_clients(ds, cfg, seed=0)
    assert sorted({ds.groups[i] for i in test}) == ["t0", "t1", "t2"]  # the held-out sample keeps every group
    assert [sorted(set(ds.groups[c].tolist())) for c in clients] == [["t0"], ["t1"], ["t2"]]


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


def test_deduplicate_drops_repeated_rows_before_the_split(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ALPACA[:5] * 3))
    assert len(load_dataset(chat(name=str(path))).conversations) == 15
    assert len(load_dataset(chat(name=str(path), deduplicate=True)).conversations) == 5


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


def test_a_classification_data_set_with_its_own_test_split(tmp_path):
    rows = [{"text": f"text {i}", "label": ["neg", "pos"][i % 2]} for i in range(30)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:24]),
                          "test": datasets.Dataset.from_list(rows[24:])}).save_to_disk(str(tmp_path / "cls"))
    cfg = DataConfig(name=str(tmp_path / "cls"), label_column="label", partition="iid", num_clients=2)
    ds = load_text_dataset(cfg)
    assert ds.label_names == ["neg", "pos"] and ds.held_out.sum() == 6
    clients, test = split_clients(ds, cfg, seed=0)
    assert [ds.texts[i] for i in test] == [f"text {i}" for i in range(24, 30)]
    assert sorted(i for c in clients for i in c) == list(range(24))
