"""Nodes with their own data files, on an in-process grid: the same code path as the shared-data
mode (same adapter), federated evaluation (the recorded mean is the weighted mean of each
client's own score), a node with a bad file fails alone, the coordinator's console and summary."""

import json
import logging
import shlex

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")

from flwr.app import Error, Message  # noqa: E402

from fedlora.config import default_config_path, load_config  # noqa: E402
from fedlora.data import load_dataset, subsample  # noqa: E402
from fedlora.experiment import build_experiment  # noqa: E402
from fedlora.flower import client_app  # noqa: E402
from fedlora.flower.inprocess import InProcessGrid  # noqa: E402
from fedlora.flower.run_config import (  # noqa: E402
    NODE_DATA,
    NODE_PARTITION,
    RUN_CONFIG_FILE,
    RUN_MIN_NODES,
    RUN_NODE_DATA,
    RUN_OVERRIDES,
    RUN_REGISTER_TIMEOUT,
    RUN_ROUND_TIMEOUT,
)
from fedlora.flower.server_app import serve  # noqa: E402
from fedlora.runner import read_metrics, run  # noqa: E402
from fedlora.simulate import simulate_round  # noqa: E402

from ..conftest import tiny_overrides  # noqa: E402

LABELS = '["negative", "neutral", "positive"]'  # the sorted classes of the built-in corpus


def write_rows(path, rows):
    """``rows`` ({text, sentiment}) as the file type ``path`` names."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        import csv

        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "sentiment"])
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


def partition_files(cfg, tmp_path):
    """Each client's rows of the shared-data split in its own file (JSONL, parquet, CSV, JSONL), and
    the held-out rows in a JSONL: exactly what the simulator trains and scores on."""
    ds = subsample(load_dataset(cfg.data), cfg.data.max_examples, cfg.seed)
    exp_rows = build_experiment(cfg).data

    def rows(idx):
        return [{"text": ds.texts[i], "sentiment": ds.label_names[ds.labels[i]]} for i in idx]

    files = []
    for cid, idx in enumerate(exp_rows.clients):
        d = tmp_path / f"org{cid}"
        d.mkdir()
        f = d / f"train{['.jsonl', '.parquet', '.csv', '.jsonl'][cid % 4]}"
        write_rows(f, rows(idx))
        files.append(f)
    test = tmp_path / "server_test.jsonl"
    write_rows(test, rows(exp_rows.test))
    return files, test


def node_run(overrides, node_configs, **run_cfg):
    run_config = {RUN_CONFIG_FILE: "", RUN_OVERRIDES: shlex.join(overrides), RUN_ROUND_TIMEOUT: 30.0,
                  RUN_REGISTER_TIMEOUT: 5.0, RUN_NODE_DATA: True, **run_cfg}
    grid = InProcessGrid(client_app.app, node_configs, run_config)
    return grid, serve(grid, run_config)


@pytest.mark.parametrize("where", ["server", "clients"])
def test_node_files_holding_the_partitions_give_the_simulators_run(tiny_bert_dir, tmp_path, where):
    """Acceptance 2 (and 3 on Flower): same adapter to 1e-5, same evaluations, same per-client scores."""
    kw = dict(federation__fraction=0.75, eval__where=f'"{where}"', eval__client_fraction=0.25 if where != "server"
              else 0.0)
    sim_cfg = load_config(default_config_path(), tiny_overrides(tiny_bert_dir, tmp_path / "sim", **kw))
    run(sim_cfg, simulate_round, progress=False)
    files, test = partition_files(load_config(default_config_path(), tiny_overrides(tiny_bert_dir, tmp_path / "x")),
                                  tmp_path)
    node_kw = dict(kw, data__name=f'"{tmp_path / "nowhere" / "data.jsonl"}"', data__labels=LABELS,
                   eval__server_data=f'"{test}"' if where == "server" else '""')
    grid, summary = node_run(tiny_overrides(tiny_bert_dir, tmp_path / "fl", **node_kw),
                             [{NODE_PARTITION: i, NODE_DATA: str(f)} for i, f in enumerate(files)])
    a = load_file(str(tmp_path / "sim/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "fl/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    sim_rows, fl_rows = read_metrics(tmp_path / "sim"), read_metrics(tmp_path / "fl")
    assert len(sim_rows) == len(fl_rows) == 3
    for s, f in zip(sim_rows, fl_rows):
        assert ("eval_accuracy" in f) == ("eval_accuracy" in s)
        if "eval_accuracy" not in s:
            continue
        assert f["eval_accuracy"] == pytest.approx(s["eval_accuracy"], abs=1e-9)
        assert f["eval_loss"] == pytest.approx(s["eval_loss"], rel=1e-5)
        if where == "clients":
            assert f["eval_clients"].keys() == s["eval_clients"].keys() == {"0", "1", "2", "3"}
            for c, m in s["eval_clients"].items():
                assert f["eval_clients"][c]["examples"] == m["examples"]
                assert f["eval_clients"][c]["loss"] == pytest.approx(m["loss"], rel=1e-5)
    if where == "clients":
        assert grid.sent[1000, "evaluate"] == 2  # rounds 0 and 2 (the last): the global model went to every node
    # never sampled at fraction 0.75 in 2 rounds: never sent a task, so never contributed
    assert summary["never_contributed"] == [c for c in range(4) if grid.sent[1000 + c, "train"] == 0]


def test_client_evaluation_in_the_simulator_is_the_weighted_mean_of_direct_scores(tiny_bert_dir, tmp_path):
    """Acceptance 3, simulator: each client's held-out accuracy recomputed by hand from the final global
    model; the recorded mean is their example-weighted mean."""
    cfg = load_config(default_config_path(), tiny_overrides(tiny_bert_dir, tmp_path / "sim", eval__where='"both"'))
    exp = build_experiment(cfg)
    run(cfg, simulate_round, progress=False, exp=exp)
    last = read_metrics(tmp_path / "sim")[-1]
    exp.lm.load(exp.server.global_task())
    exp.lm.model.eval()
    direct = {}
    with torch.no_grad():
        for c, rows in enumerate(exp.data.client_test):
            enc = exp.data.encoded
            logits = exp.lm.model(input_ids=enc.input_ids[rows], attention_mask=enc.attention_mask[rows]).logits
            direct[c] = (len(rows), (logits.argmax(-1) == enc.labels[rows]).double().mean().item())
    for c, (n, acc) in direct.items():
        assert last["eval_clients"][str(c)]["examples"] == n
        assert last["eval_clients"][str(c)]["accuracy"] == pytest.approx(acc, abs=1e-9)
    mean = sum(n * a for n, a in direct.values()) / sum(n for n, _ in direct.values())
    assert last["eval_clients_accuracy"] == pytest.approx(mean, abs=1e-9)
    assert "eval_accuracy" in last  # "both": the server's held-out set too
    assert all(len(set(t) & set(c)) == 0 for t, c in zip(exp.data.client_test, exp.data.clients))


def test_default_evaluation_keeps_the_split_unchanged(tiny_bert_dir, tmp_path):
    from fedlora.data import split_clients

    cfg = load_config(default_config_path(), tiny_overrides(tiny_bert_dir, tmp_path / "d"))
    exp = build_experiment(cfg)
    clients, test = split_clients(subsample(load_dataset(cfg.data), cfg.data.max_examples, cfg.seed), cfg.data,
                                  cfg.seed)
    assert exp.data.client_test is None
    assert all((a == b).all() for a, b in zip(exp.data.clients, clients)) and (exp.data.test == test).all()


def test_a_node_with_a_missing_or_malformed_file_fails_alone(tiny_bert_dir, tmp_path, caplog):
    """Acceptance 7; and acceptance 6's console lines and never_contributed."""
    good = []
    for i, suffix in enumerate((".jsonl", ".csv")):
        f = tmp_path / f"good{i}{suffix}"
        write_rows(f, [{"text": f"row {j} of org {i}", "sentiment": ["negative", "positive"][j % 2]}
                       for j in range(20 + 10 * i)])
        good.append(f)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "sentiment": "neutral"}\n{"text": "SECRET-ROW-CONTENT", oops\n')
    alien = tmp_path / "alien.jsonl"
    write_rows(alien, [{"text": "SECRET-ALIEN", "sentiment": "furious"}, {"text": "b", "sentiment": "neutral"}])
    nodes = [{NODE_PARTITION: 0, NODE_DATA: str(good[0])}, {NODE_PARTITION: 1, NODE_DATA: str(tmp_path / "gone.csv")},
             {NODE_PARTITION: 2, NODE_DATA: str(bad)}, {NODE_PARTITION: 3, NODE_DATA: str(good[1])},
             {NODE_PARTITION: 4, NODE_DATA: str(alien)}]
    over = tiny_overrides(tiny_bert_dir, tmp_path / "fl", data__num_clients=5, federation__fraction=1.0,
                          data__name='"/nonexistent/train.jsonl"', data__labels=LABELS, eval__where='"clients"')
    with caplog.at_level(logging.INFO):
        grid, summary = node_run(over, nodes, **{RUN_MIN_NODES: 2})
    text = caplog.text
    assert summary["status"] == "finished" and summary["rounds_aggregated"] == 2
    assert "SECRET" not in text
    lines = [r.getMessage() for r in caplog.records]
    assert any("node 1001 did not register" in m and "gone.csv" in m and "file not found" in m for m in lines)
    assert any("node 1002 did not register" in m and "bad.jsonl line 2 is not valid JSON" in m for m in lines)
    assert any("node 1004 did not register" in m and "'furious'" in m for m in lines)
    # the nodes' own counts, capped: 16 and 24 training rows (a fifth held out), not the server's split
    assert any("node 1000 (client 0): 16 examples declared, 16 counted" in m for m in lines)
    assert any(m.startswith("round 2/2: clients answered 2, dropped 3, rejected 0, train loss") and "accuracy" in m
               for m in lines)
    last = read_metrics(tmp_path / "fl")[-1]
    assert set(last["eval_clients"]) == {"0", "3"}
    on_disk = json.loads((tmp_path / "fl" / "summary.json").read_text())
    assert on_disk["never_contributed"] == []


def test_a_registered_client_that_never_contributed_is_named(tiny_bert_dir, tmp_path):
    f = tmp_path / "a.jsonl"
    write_rows(f, [{"text": f"t{j}", "sentiment": ["negative", "positive"][j % 2]} for j in range(30)])
    over = tiny_overrides(tiny_bert_dir, tmp_path / "fl", data__num_clients=2, federation__fraction=1.0,
                          data__name='"/nonexistent.jsonl"', data__labels=LABELS, eval__where='"clients"',
                          reliability__min_clients=1)
    run_config = {RUN_CONFIG_FILE: "", RUN_OVERRIDES: shlex.join(over), RUN_ROUND_TIMEOUT: 30.0,
                  RUN_REGISTER_TIMEOUT: 5.0, RUN_NODE_DATA: True}
    grid = InProcessGrid(client_app.app, [{NODE_PARTITION: i, NODE_DATA: str(f)} for i in range(2)], run_config)
    grid.tamper[1001] = lambda msg, reply: (Message(Error(code=0, reason="out of memory"), reply_to=msg)
                                            if msg.metadata.message_type == "train" else reply)
    summary = serve(grid, run_config)
    assert summary["never_contributed"] == [1]
    assert json.loads((tmp_path / "fl" / "summary.json").read_text())["never_contributed"] == [1]
