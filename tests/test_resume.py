"""Crash safety (issue 5 acceptance 1 and 3): SIGKILL at random points, including inside
checkpoint writes, then resume: the final adapter is byte-identical to an uninterrupted run."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from fedlora.checkpoint import (
    WRITE_DELAY_ENV,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    save_checkpoint,
)
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.experiment import build_experiment
from fedlora.simulate import simulate_round

from .conftest import tiny_overrides

ROUNDS = 60


def sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def rows(p):
    out = [json.loads(line) for line in p.read_text().splitlines()]
    for r in out:
        r.pop("wall_time_s")
    return out


def test_sigkill_at_random_points_then_resume_is_byte_identical(tiny_bert_dir, tmp_path):
    extra = dict(federation__rounds=ROUNDS, federation__eval_every=20)
    ref = tmp_path / "ref"
    assert main(["run", *tiny_overrides(tiny_bert_dir, ref, **extra), "--quiet"]) == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fedlora.cli", "run", *tiny_overrides(tiny_bert_dir, out, **extra),
           "--quiet", "--resume"]
    env = {**os.environ, WRITE_DELAY_ENV: "0.05"}  # widen the write window so kills land in it
    rng = random.Random(1234)
    kills, in_write, finished = 0, 0, False
    deadline = time.monotonic() + 240
    while not finished and time.monotonic() < deadline:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kills >= 20:
            finished = proc.wait(timeout=180) == 0
            break
        # wait for the run to reach the rounds (a checkpoint or temp file appears), then strike
        ck = out / "checkpoints"
        seen = {p.name for p in ck.iterdir()} if ck.exists() else set()
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 60:
            now = {p.name for p in ck.iterdir()} if ck.exists() else set()
            if now - seen:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.35))
        if proc.poll() is not None:  # it finished before the kill
            finished = proc.returncode == 0
            break
        in_write += any(".tmp" in p.name for p in ck.iterdir()) if ck.exists() else 0
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        for p in list_checkpoints(ck):  # no kill ever leaves a torn checkpoint
            read_checkpoint(p)
    assert finished, f"run did not finish after {kills} kills"
    assert kills >= 20 and in_write >= 1, (kills, in_write)
    assert sha(out / "adapter/adapter_model.safetensors") == sha(ref / "adapter/adapter_model.safetensors")
    assert rows(out / "metrics.jsonl") == rows(ref / "metrics.jsonl")


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.ones(3)})
    newest = save_checkpoint(tmp_path, 2, {"x": torch.full((3,), 2.0)})
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        rnd, payload = latest_checkpoint(tmp_path)
    assert rnd == 1 and torch.equal(payload["x"], torch.ones(3))
    newest.write_bytes(bytes(data[:20]))  # truncated
    with pytest.warns(UserWarning, match="truncated"):
        assert latest_checkpoint(tmp_path)[0] == 1


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
            torch.testing.assert_close(f.A, replay["strategy"]["factors"][name].A, rtol=0, atol=0)
            torch.testing.assert_close(f.B, replay["strategy"]["factors"][name].B, rtol=0, atol=0)
        exp.server.load_state_dict(after)
    assert dropped_any
    assert not torch.equal(start["strategy"]["factors"][next(iter(start["strategy"]["factors"]))].B,
                           exp.server.state_dict()["strategy"]["factors"][next(iter(start["strategy"]["factors"]))].B)


def test_injected_client_exception_is_survived(tiny_bert_dir, tmp_path):
    out = tmp_path / "f"
    assert main(["run", *tiny_overrides(tiny_bert_dir, out, reliability__fail_clients="[0, 1]",
                                        federation__fraction=1.0), "--quiet"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()[1:]]
    assert all(r["dropped_clients"] == [0, 1] and r["clients"] == 4 for r in lines)
