"""The Flower carrier, on an in-process grid: the same strategies give the simulator's adapter; node
budgets come from node-config; failing and vanished nodes are dropped and named."""

import json
import logging
import shlex
import threading

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")

from fedlora.config import (
    default_config_path,  # noqa: E402
    load_config,  # noqa: E402
)
from fedlora.flower import client_app, codec  # noqa: E402
from fedlora.flower.inprocess import InProcessGrid  # noqa: E402
from fedlora.flower.run_config import (  # noqa: E402
    NODE_BUDGET,
    NODE_PARTITION,
    RUN_CONFIG_FILE,
    RUN_MIN_NODES,
    RUN_OVERRIDES,
    RUN_REGISTER_TIMEOUT,
    RUN_ROUND_TIMEOUT,
)
from fedlora.flower.server_app import serve  # noqa: E402
from fedlora.runner import run  # noqa: E402
from fedlora.simulate import simulate_round  # noqa: E402
from fedlora.types import ClientTask, ClientUpdate, Factors, tensors_of  # noqa: E402

from ..conftest import tiny_overrides  # noqa: E402


def flower_run(overrides, num_nodes, budgets=None, on_round=None, node_configs=None, public_keys=None,
               before_serve=None, **run_cfg):
    """The ServerApp's own `serve` over an in-process grid of ``num_nodes`` nodes (node ``1000 + i`` holds
    partition ``i``); ``before_serve(grid)`` runs once before registration, ``on_round(grid, rnd, exp)``
    before each round. Returns (exp, summary)."""
    run_config = {RUN_CONFIG_FILE: "", RUN_OVERRIDES: shlex.join(overrides), RUN_ROUND_TIMEOUT: 30.0,
                  RUN_REGISTER_TIMEOUT: 5.0, "round-grace": 0.5, **run_cfg}
    node_configs = node_configs or [{NODE_PARTITION: i, **({NODE_BUDGET: budgets[i]} if budgets else {})}
                                    for i in range(num_nodes)]
    grid = InProcessGrid(client_app.app, node_configs, run_config, public_keys=public_keys)
    seen = {}

    def before_round(exp, rnd):
        seen["exp"] = exp
        if on_round:
            on_round(grid, rnd, exp)

    if before_serve:
        before_serve(grid)
    summary = serve(grid, run_config, before_round=before_round)
    return seen.get("exp"), summary


@pytest.mark.parametrize("strategy", ["fslora", "flexlora"])
def test_flower_run_equals_the_simulator(tiny_bert_dir, tmp_path, strategy):
    sim_out, fl_out = tmp_path / "sim", tmp_path / "flower"
    kw = dict(strategy__name=strategy, federation__fraction=0.75)
    # the same base as the Flower run config with no file: the built-in default config
    sim_cfg = load_config(default_config_path(), tiny_overrides(tiny_bert_dir, sim_out, **kw))
    run(sim_cfg, simulate_round, progress=False)
    flower_run(tiny_overrides(tiny_bert_dir, fl_out, **kw), num_nodes=4)
    a = load_file(str(sim_out / "adapter/adapter_model.safetensors"))
    b = load_file(str(fl_out / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert (sim_out / "metrics.jsonl").read_text().count("\n") == (fl_out / "metrics.jsonl").read_text().count("\n")


def test_node_budgets_come_from_node_config(tiny_bert_dir, tmp_path):
    exp, _ = flower_run(tiny_overrides(tiny_bert_dir, tmp_path / "b", federation__rounds=1,
                                       federation__fraction=1.0), num_nodes=4, budgets=[2, 2, 4, 8])
    assert exp.server.budgets == [2, 2, 4, 8]
    row = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[1])
    task_bytes = sum(r * (o + i) * 4 for r in (2, 2, 4, 8) for o, i in exp.lm.shapes().values())
    head_bytes = 4 * sum(t.numel() for t in exp.server.head.values()) * 4
    assert row["bytes_down"] == task_bytes + head_bytes  # each node got a sketch of its own size


def test_a_node_that_misses_its_first_profile_query_is_asked_again_while_registering(tiny_bert_dir, tmp_path,
                                                                                    caplog):
    def late(grid):  # node 1003 sleeps through its first profile query (as a ClientApp that starts late)
        push, asleep = grid.push_messages, []

        def push_messages(messages):
            messages = list(messages)
            if not asleep and any(m.metadata.dst_node_id == 1003 for m in messages):
                asleep.append(1003)
                grid.silent.add(1003)
                threading.Timer(3.0, grid.silent.discard, (1003,)).start()  # awake before it is asked again (5 s)
            return push(messages)

        grid.push_messages = push_messages

    with caplog.at_level(logging.WARNING, logger="fedlora"):
        exp, summary = flower_run(tiny_overrides(tiny_bert_dir, tmp_path / "late", federation__rounds=1,
                                                 federation__fraction=1.0), num_nodes=4, before_serve=late,
                                  **{RUN_MIN_NODES: 4, RUN_REGISTER_TIMEOUT: 30.0})
    assert "node 1003 did not register: no reply within 0.5 s" in caplog.text  # the first ask failed
    assert len(exp.server.budgets) == 4 and summary["final_accuracy"] >= 0  # the second bound client 3


def test_failing_and_vanished_nodes_are_dropped_and_named(tiny_bert_dir, tmp_path, caplog):
    def faults(grid, rnd, exp):
        if rnd == 2:  # node 1001 (client 1) starts failing: its app raises on every message
            grid.contexts[1001].node_config[NODE_PARTITION] = 10_000
        if rnd == 3:  # node 1002 (client 2) disappears; the SuperLink reports node 1003 (client 3)
            grid.offline.add(1002)  # unavailable (an error sent by node 1, not by 1003);
            grid.unreachable.add(1003)  # node 1004 (client 4) takes the task and never answers
            grid.silent.add(1004)

    with caplog.at_level(logging.WARNING, logger="fedlora"):
        exp, summary = flower_run(tiny_overrides(tiny_bert_dir, tmp_path / "f", federation__fraction=1.0,
                                                 federation__rounds=3, data__num_clients=6), num_nodes=6,
                                  on_round=faults)
    rows = [json.loads(x) for x in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()[1:]]
    assert [r["dropped_clients"] for r in rows] == [[], [1], [1, 2, 3, 4]]
    assert "round 2: node 1001 (client 1) dropped: ValueError" in caplog.text
    assert "round 3: client 2 dropped: its node 1002 is not connected" in caplog.text
    assert "round 3: node 1003 (client 3) dropped: Node Unavailable" in caplog.text
    assert "round 3: node 1004 (client 4) dropped: no reply within 0.5 s after 4 of 5 answered " \
           "(round-grace)" in caplog.text
    assert "node 1 " not in caplog.text  # the SuperLink's error is pinned on the node it is about
    assert rows[2]["clients"] == 5 and rows[2]["dropped"] == 3  # clients 0 and 5 aggregated
    assert summary["final_accuracy"] == rows[-1]["eval_accuracy"]  # the last round's, written last


def test_too_few_replies_skip_the_round_without_changing_the_global_state(tiny_bert_dir, tmp_path):
    states = {}

    def faults(grid, rnd, exp):
        states[rnd] = {k: v.clone() for k, v in tensors_of(exp.server.global_task()).items()}
        grid.unreachable = {1001, 1002, 1003} if rnd == 2 else set()  # round 2: 1 reply < min_clients=2

    flower_run(tiny_overrides(tiny_bert_dir, tmp_path / "s", federation__fraction=1.0, federation__rounds=3,
                              reliability__min_clients=2), num_nodes=4, on_round=faults)
    rows = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[1:]]
    assert [r.get("skipped", 0) for r in rows] == [0, 1, 0]
    assert all(torch.equal(states[3][k], states[2][k]) for k in states[2])
    assert not all(torch.equal(states[2][k], states[1][k]) for k in states[1])


def test_codec_round_trips_tasks_and_updates():
    g = torch.Generator().manual_seed(0)
    f = {"enc.layer.0.q": Factors(torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g))}
    d = {"enc.layer.0.q": Factors(torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g))}
    task = ClientTask(factors=f, scale=0.75, freeze_A=True, base_delta=d, fingerprint="abc",
                      head={"classifier.weight": torch.randn(3, 4, generator=g)},
                      config={"sketch_ratio": 0.5})
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    rnd, back = codec.decode_task(codec.encode_task(task, 7))
    assert rnd == 7 and back.scale == 0.75 and back.freeze_A is True
    assert back.config == task.config and back.fingerprint == "abc"
    for n in f:
        assert torch.equal(back.factors[n].A, f[n].A) and torch.equal(back.base_delta[n].B, d[n].B)
    assert torch.equal(back.head["classifier.weight"], task.head["classifier.weight"])
    upd = ClientUpdate(factors={n: Factors(x.A, x.B + 1) for n, x in f.items()}, num_examples=9,
                       head=task.head, metrics={"train_loss": 0.5}, fingerprint="abc", freeze_A=True)
    enc = codec.encode_update(upd)
    assert not any(k.endswith(".A") for k in codec.tensors_in(enc.array_records[codec.ARRAYS]))  # A not sent
    got = codec.decode_update(enc, task)
    assert got.num_examples == 9 and got.fingerprint == "abc" and got.metrics == {"train_loss": 0.5}
    assert torch.equal(got.factors["enc.layer.0.q"].A, f["enc.layer.0.q"].A)
    assert torch.equal(got.factors["enc.layer.0.q"].B, f["enc.layer.0.q"].B + 1)
