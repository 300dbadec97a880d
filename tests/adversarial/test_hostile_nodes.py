"""The ServerApp against nodes that lie, send garbage, replay, restart, or outlive it (in-process grid):
each bad node is refused, clamped or rejected with a typed reason; the run goes on with the rest, and
the global state is the aggregate of the valid updates alone."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402

from fedlora.checkpoint import checkpoint_path  # noqa: E402
from fedlora.flower import client_app, codec, server_app  # noqa: E402
from fedlora.flower.inprocess import InProcessGrid  # noqa: E402
from fedlora.flower.run_config import (  # noqa: E402
    NODE_BUDGET,
    NODE_PARTITION,
    RUN_CONFIG_FILE,
    RUN_MIN_BUDGET,
    RUN_MIN_NODES,
    RUN_OVERRIDES,
    RUN_REGISTRY,
)
from fedlora.types import tensors_of  # noqa: E402

from ..conftest import tiny_overrides  # noqa: E402
from ..flower.test_client_registry import make_key  # noqa: E402
from ..flower.test_server_app import flower_run  # noqa: E402


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()[1:]]


def global_state(exp):
    return {k: v.clone() for k, v in tensors_of(exp.server.global_task()).items()}


def edit_train_replies(edit):
    """A node that sends its honest reply after ``edit(content)`` (train replies only)."""
    def tamper(msg, reply):
        if msg.metadata.message_type == codec.TRAIN:
            edit(reply.content)
        return reply
    return tamper


def edit_arrays(edit):
    def on_content(content):
        sd = codec.tensors_in(content.array_records[codec.ARRAYS])
        edit(sd)
        content.array_records[codec.ARRAYS] = codec.pack_tensors(sd)
    return edit_train_replies(on_content)


def set_meta(key, value):
    def on_content(content):
        if value is None:
            del content.config_records[codec.META][key]
        else:
            content.config_records[codec.META][key] = value
    return edit_train_replies(on_content)


def first(sd, suffix):
    return next(k for k in sd if k.endswith(suffix))


def grow_rank(sd):  # a consistent pair of the wrong rank
    a, b = first(sd, ".A"), first(sd, ".B")
    sd[a], sd[b] = torch.cat([sd[a], sd[a][:1]]), torch.cat([sd[b], sd[b][:, :1]], dim=1)


def to_3d(sd):
    a = first(sd, ".A")
    sd[a] = sd[a].unsqueeze(0)


def head_as(dtype):
    def edit(sd):
        h = first(sd, "classifier.weight")
        sd[h] = sd[h].round().to(dtype)
    return edit


MALFORMED = {  # node -> (the lie, the reason it is rejected with)
    1001: (edit_arrays(grow_rank), "wrong_shape"),
    1002: (edit_arrays(to_3d), "wrong_shape (lora."),  # read from the metadata, before any tensor is built
    1003: (set_meta("num_examples", None), "malformed (Malformed: missing field 'num_examples')"),
    1004: (set_meta("num_examples", 2.5), "malformed (Malformed: field 'num_examples' must be int"),
    1005: (edit_arrays(head_as(torch.int64)), "wrong_dtype (head classifier.weight is torch.int64"),
    1006: (edit_arrays(head_as(torch.float64)), "wrong_dtype (head classifier.weight is torch.float64"),
    1007: (edit_arrays(lambda sd: sd.update({"evil.payload": torch.zeros(2)})), "malformed (Malformed: unexpected"),
}


def test_malformed_replies_reject_their_client_and_the_round_aggregates_the_rest(tiny_bert_dir, tmp_path, caplog):
    kw = dict(federation__fraction=1.0, federation__rounds=1, data__num_clients=9)
    states = {}

    def lies(grid, rnd, exp):
        grid.tamper.update({node: lie for node, (lie, _) in MALFORMED.items()})

    def silent(grid, rnd, exp):  # the reference: the same nodes never answer
        grid.silent.update(MALFORMED)

    with caplog.at_level(logging.WARNING, logger="fedlora"):
        exp, _ = flower_run(tiny_overrides(tiny_bert_dir, tmp_path / "bad", **kw), 9, on_round=lies)
    states["bad"] = global_state(exp)
    for node, (_, reason) in MALFORMED.items():
        assert f"round 1: rejected client {node - 1000}: {reason}" in caplog.text
    assert rows(tmp_path / "bad")[0]["rejected"] == len(MALFORMED)
    exp, _ = flower_run(tiny_overrides(tiny_bert_dir, tmp_path / "ref", **kw), 9, on_round=silent)
    states["ref"] = global_state(exp)
    assert states["bad"].keys() == states["ref"].keys()
    for k in states["ref"]:
        assert torch.equal(states["bad"][k], states["ref"][k]), k  # clients 0 and 8 alone
    assert exp.server.head["classifier.weight"].dtype == torch.float32


def test_an_inflated_example_count_buys_no_weight(tiny_bert_dir, tmp_path, caplog):
    kw = dict(federation__fraction=1.0, federation__rounds=2)

    def lies(grid, rnd, exp):
        grid.tamper[1001] = set_meta("num_examples", 10**9)  # above the server's count: rejected
        grid.tamper[1002] = set_meta("num_examples", 1)  # below it: weighs the server's count all the same

    with caplog.at_level(logging.WARNING, logger="fedlora"):
        exp, _ = flower_run(tiny_overrides(tiny_bert_dir, tmp_path / "lie", **kw), 4, on_round=lies)
    lied = global_state(exp)
    assert "round 1: rejected client 1: bad_example_count (1000000000 not in [1, " in caplog.text
    assert exp.server.num_examples == [len(c) for c in exp.data.clients]  # the server's split

    def drop_1(grid, rnd, exp):
        grid.silent.add(1001)

    exp, _ = flower_run(tiny_overrides(tiny_bert_dir, tmp_path / "ref", **kw), 4, on_round=drop_1)
    assert all(torch.equal(lied[k], v) for k, v in global_state(exp).items())


def test_claims_on_taken_or_unknown_clients_and_bad_budgets_are_refused_or_clamped(tiny_bert_dir, tmp_path, caplog):
    nodes = [{NODE_PARTITION: 0, NODE_BUDGET: 0},  # clamped to 1
             {NODE_PARTITION: 1, NODE_BUDGET: 10**6},  # clamped to the global rank, 8
             {NODE_PARTITION: 2, NODE_BUDGET: 2.5},  # refused: malformed
             {NODE_PARTITION: 3},  # the config's budget
             {NODE_PARTITION: 0, NODE_BUDGET: 8},  # refused: client 0 is taken (node 1000 keeps it)
             {NODE_PARTITION: 99}, {NODE_PARTITION: -1}, {NODE_BUDGET: 4}]  # refused; no partition-id: no profile
    grids = []
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        exp, summary = flower_run(tiny_overrides(tiny_bert_dir, tmp_path / "r", federation__fraction=1.0,
                                                 budgets__per_client="[2, 2, 2, 4]"),
                                  0, node_configs=nodes, on_round=lambda grid, rnd, exp: grids.append(grid),
                                  **{RUN_MIN_NODES: 3})
    assert grids[0].sent[1007, codec.QUERY] == 3  # asked once while registering, then once a round
    assert grids[0].sent[1004, codec.QUERY] == 1 and grids[0].sent[1004, codec.TRAIN] == 0  # refused: asked once
    assert exp.server.budgets == [1, 8, 2, 4]
    last = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["final_accuracy"] == last["eval_accuracy"]  # the run went to its end
    log = caplog.text
    assert "node 1002 refused: malformed (Malformed: field 'budget' must be int, got float 2.5)" in log
    assert "node 1004 refused: slot_taken (client 0 is held by node 1000)" in log
    assert "node 1005 refused: out_of_range (partition-id 99 is not in [0, 4))" in log
    assert "node 1006 refused: out_of_range (partition-id -1 is not in [0, 4))" in log
    assert "node 1007 did not register: ValueError: node-config has no partition-id" in log
    assert "round 1: client 2 dropped: its node (never registered) is not connected" in log
    assert [r["dropped_clients"] for r in rows(tmp_path / "r")] == [[2], [2]]


def test_replayed_updates_are_rejected_as_stale(tiny_bert_dir, tmp_path, caplog):
    kept = {}

    def replay(msg, reply):
        kept.setdefault("round 1", reply.content)
        reply.content = kept["round 1"]
        return reply

    def faults(grid, rnd, exp):
        grid.tamper[1001] = replay

    with caplog.at_level(logging.WARNING, logger="fedlora"):
        flower_run(tiny_overrides(tiny_bert_dir, tmp_path / "s", federation__fraction=1.0, data__num_clients=3),
                   3, on_round=faults)
    assert [r["rejected"] for r in rows(tmp_path / "s")] == [0, 1]
    assert "round 2: rejected client 1: stale (it does not carry the nonce of this round's task)" in caplog.text


@pytest.mark.parametrize("linger, key, dropped", [
    (False, b"fresh", [[], [1], []]),  # the old node is gone: a new node may take its client
    (True, b"fresh", [[], [1], [1]]),  # refused while the old id is listed, and never later
    (True, None, [[], [1], []]),  # same key: its client back at once, old id listed or not
], ids=["gone", "still-listed", "same-key"])
def test_a_restarted_node_is_registered_again_and_trains_from_the_next_round(tiny_bert_dir, tmp_path, linger,
                                                                             key, dropped, caplog):
    new = {}

    def faults(grid, rnd, exp):
        if rnd == 2:  # node 1001 restarts: new node id, a new key or the same one
            new["id"] = grid.restart(1001, public_key=key, linger=linger)
        if rnd == 3:
            grid.offline.add(1001)  # by now the SuperLink has noticed

    out = tmp_path / str(linger)
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        flower_run(tiny_overrides(tiny_bert_dir, out, federation__fraction=1.0, federation__rounds=3,
                                  data__num_clients=3), 3, on_round=faults, public_keys=[b"k0", b"k1", b"k2"])
    assert [r["dropped_clients"] for r in rows(out)] == dropped
    assert new["id"] == 1003
    assert ("node 1003 refused: slot_taken" in caplog.text) == (dropped[2] == [1])


def test_an_owner_back_under_its_node_id_is_asked_again_and_keeps_its_client(tiny_bert_dir, tmp_path, caplog):
    grids = []

    def faults(grid, rnd, exp):
        grids.append(grid)
        if rnd == 2:
            grid.offline.add(1001)  # the SuperLink lost it for a while
        if rnd == 3:
            grid.offline.discard(1001)  # it reconnects under the same node id

    out = tmp_path / "back"
    flower_run(tiny_overrides(tiny_bert_dir, out, federation__fraction=1.0, federation__rounds=3,
                              data__num_clients=3), 3, on_round=faults)
    assert [r["dropped_clients"] for r in rows(out)] == [[], [1], []]
    assert grids[0].sent[1001, codec.QUERY] == 2  # asked once at registration, once on its return


def test_a_budget_below_the_operators_floor_cannot_set_fedits_common_rank(tiny_bert_dir, tmp_path, caplog):
    kw = dict(strategy__name="fedit", federation__fraction=1.0, federation__rounds=1,
              budgets__per_client="[8, 8, 8, 8]")
    exp, _ = flower_run(tiny_overrides(tiny_bert_dir, tmp_path / "open", **kw), 4, budgets=[4, 1, 8, 8],
                        **{RUN_MIN_NODES: 3})
    assert exp.server.strategy.rank == 1  # without a floor one node sets the rank of all
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        exp, _ = flower_run(tiny_overrides(tiny_bert_dir, tmp_path / "floor", **kw), 4, budgets=[4, 1, 8, 8],
                            **{RUN_MIN_NODES: 3, RUN_MIN_BUDGET: 4})
    assert exp.server.strategy.rank == 4 and rows(tmp_path / "floor")[0]["dropped_clients"] == [1]
    assert "node 1001 refused: below_floor (budget 1 for client 1 is below the run's floor 4" in caplog.text


def test_fedit_takes_its_common_rank_from_the_registered_budgets(tiny_bert_dir, tmp_path, caplog):
    kw = dict(strategy__name="fedit", federation__fraction=1.0, budgets__per_client="[8, 8, 8, 8]")

    def late_small_node(grid, rnd, exp):
        if rnd == 1:
            grid.restart(1003, public_key=b"", linger=False)  # comes back declaring budget 1
            grid.contexts[1004].node_config[NODE_BUDGET] = 1

    with caplog.at_level(logging.WARNING, logger="fedlora"):
        exp, _ = flower_run(tiny_overrides(tiny_bert_dir, tmp_path / "f", **kw), 4, budgets=[4, 2, 8, 8],
                            on_round=late_small_node)
    assert exp.server.strategy.rank == 2 and exp.budgets == [4, 2, 8, 8]
    task_bytes = sum(2 * (o + i) * 4 for o, i in exp.lm.shapes().values())  # rank 2, float32
    head_bytes = sum(t.numel() for t in exp.server.head.values()) * 4
    assert rows(tmp_path / "f")[0]["bytes_down"] == 3 * (task_bytes + head_bytes)  # node 1003 was away
    assert "round 2: client 3 not sent its task: rank 2 exceeds its budget 1" in caplog.text


def test_a_relaunched_serverapp_resumes_from_its_checkpoint(tiny_bert_dir, tmp_path, caplog):
    kw = dict(federation__fraction=1.0, federation__rounds=3)
    flower_run(tiny_overrides(tiny_bert_dir, tmp_path / "whole", **kw), 4)

    def superlink_lost(grid, rnd, exp):
        if rnd == 3:
            raise ConnectionError("SuperLink went away")

    out = tmp_path / "relaunched"
    with pytest.raises(ConnectionError):
        flower_run(tiny_overrides(tiny_bert_dir, out, **kw), 4, on_round=superlink_lost)
    assert not (out / "summary.json").exists() and checkpoint_path(out / "checkpoints", 2).exists()
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        flower_run(tiny_overrides(tiny_bert_dir, out, **kw), 4)  # resume = true is the default
    assert "resuming the run in" in caplog.text
    assert [r["round"] for r in rows(out)] == [1, 2, 3] and (out / "summary.json").exists()
    a = load_file(str(tmp_path / "whole" / "adapter/adapter_model.safetensors"))
    b = load_file(str(out / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


def test_registry_file_binds_clients_to_keys_and_sets_weights(tiny_bert_dir, tmp_path, caplog):
    (k0, ssh0), (k1, ssh1), (k2, _) = make_key(), make_key(), make_key()
    registry = tmp_path / "clients.toml"
    registry.write_text(f'[[client]]\npartition_id = 0\npublic_key = "{ssh0}"\nbudget = 4\nnum_examples = 500\n\n'
                        f'[[client]]\npartition_id = 1\npublic_key = "{ssh1}"\nbudget = 2\n')
    nodes = [{NODE_PARTITION: 0, NODE_BUDGET: 8}, {NODE_PARTITION: 1}, {NODE_PARTITION: 1}, {NODE_PARTITION: 2}]
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        exp, _ = flower_run(tiny_overrides(tiny_bert_dir, tmp_path / "k", federation__fraction=1.0,
                                           data__num_clients=3), 0, node_configs=nodes, public_keys=[k0, k1, k2, k2],
                            **{RUN_REGISTRY: str(registry), RUN_MIN_NODES: 2})
    assert exp.server.num_examples[0] == 500 and exp.server.budgets[:2] == [4, 2]
    assert "node 1002 refused: not_allowed (client 1 is registered to another node)" in caplog.text
    assert "node 1003 refused: not_allowed (the registry lists no client 2)" in caplog.text


def test_a_failed_run_raises_its_reason_in_one_line(tmp_path):
    run_config = {RUN_CONFIG_FILE: "", RUN_OVERRIDES: "", RUN_REGISTRY: str(tmp_path / "missing.toml")}
    grid = InProcessGrid(client_app.app, [{NODE_PARTITION: 0}], run_config)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(server_app.RunFailed) as e:
        server_app.app(grid, ctx)
    assert str(e.value).startswith("fedlora run failed: ConfigError: registry file not found")
    assert "\n" not in str(e.value)
