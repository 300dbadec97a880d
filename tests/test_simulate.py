"""The in-process carrier's fault injection: dropped clients are exactly the clients left out of the
aggregate; a client that raises is survived."""

import json

import pytest
import torch

from fedlora.cli import main
from fedlora.config import load_config
from fedlora.experiment import build_experiment
from fedlora.simulate import simulate_round

from .conftest import tiny_overrides


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_client_dropout_equals_aggregating_survivors_only(tiny_bert_dir, tmp_path, p):
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, tmp_path / "a", data__num_clients=6,
                                           federation__fraction=1.0, reliability__dropout=p, seed=3))
    exp = build_experiment(cfg)
    start = exp.server.state_dict()
    dropped_any = False
    for rnd in (1, 2, 3):
        before = exp.server.state_dict()
        metrics = simulate_round(exp, rnd)
        lost = metrics["dropped_clients"]
        dropped_any |= bool(lost)
        after = exp.server.state_dict()
        # replay the round by hand with only the survivors
        exp.server.load_state_dict(before)
        survivors = [c for c in range(6) if c not in lost]
        tasks = exp.server.configure(rnd, list(range(6)))
        from fedlora.experiment import train_client
        updates = {c: train_client(exp, rnd, c, tasks[c]) for c in survivors}
        exp.server.aggregate(rnd, {c: tasks[c] for c in survivors}, updates)
        replay = exp.server.state_dict()
        for name, f in after["strategy"]["factors"].items():
            torch.testing.assert_close(f["A"], replay["strategy"]["factors"][name]["A"], rtol=0, atol=0)
            torch.testing.assert_close(f["B"], replay["strategy"]["factors"][name]["B"], rtol=0, atol=0)
        exp.server.load_state_dict(after)
    assert dropped_any
    assert not torch.equal(start["strategy"]["factors"][next(iter(start["strategy"]["factors"]))]["B"],
                           exp.server.state_dict()["strategy"]["factors"][next(iter(start["strategy"]["factors"]))]["B"])


def test_injected_client_exception_is_survived(tiny_bert_dir, tmp_path):
    out = tmp_path / "f"
    assert main(["run", *tiny_overrides(tiny_bert_dir, out, reliability__fail_clients="[0, 1]",
                                        federation__fraction=1.0), "--quiet"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()[1:]]
    assert all(r["dropped_clients"] == [0, 1] and r["clients"] == 4 for r in lines)
