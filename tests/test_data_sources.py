"""Loading data: the formats, 🤗 datasets paths (parquet, csv, a saved DatasetDict with its own test
split, subset/split keys of a local data folder), and every bad input as one line naming it."""

import json

import pytest

from fedlora.config import ConfigError, DataConfig
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


def test_deduplicate_drops_repeated_rows_before_the_split(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ALPACA[:5] * 3))
    assert len(load_dataset(chat(name=str(path))).conversations) == 15
    assert len(load_dataset(chat(name=str(path), deduplicate=True)).conversations) == 5


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
