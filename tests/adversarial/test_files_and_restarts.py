"""Safe to deploy: checkpoints hold no code, --resume checks its settings, one run per output
directory, atomic writes that leave nothing behind on a full disk, and exit 3 when no round
was aggregated."""

import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlora.atomic import TEMP, write_atomic
from fedlora.checkpoint import (
    decode,
    encode,
    flatten,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    save_checkpoint,
)
from fedlora.cli import main
from fedlora.config import ConfigError, PrivacyConfig
from fedlora.export import save_peft_adapter
from fedlora.outdir import LOCK, output_lock, prepare_output_dir
from fedlora.server import FederatedServer
from fedlora.strategies import METHODS
from fedlora.strategies.fslora import FSLoRASettings
from fedlora.types import ClientTask, Factors

from ..conftest import tiny_overrides
from ..strategies.common import BUDGETS, EXAMPLES, SPECS, build, train


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted(kind: str, marker: Path) -> bytes:
    """A pickle where a checkpoint is expected: the old format (its keyless SHA-256 recomputed)
    or a bare pickle."""
    buf = io.BytesIO()
    torch.save({"round": 9, "server": Payload(marker)}, buf)
    body = buf.getvalue()
    return b"FEDLORA-CKPT-1\n" + hashlib.sha256(body).digest() + body if kind == "old" else body


def test_the_crafted_payload_is_live(tmp_path):
    """The control: unpickled, the payload does run (so its not running below means something)."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("name, kind", [("ckpt-000002.pt", "old"), ("ckpt-000002.pt", "pickle"),
                                        ("ckpt-000002.safetensors", "pickle")])
def test_a_crafted_pickle_is_skipped_or_refused_and_never_runs(tmp_path, name, kind):
    marker = tmp_path / "pwned"
    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / name).write_bytes(crafted(kind, marker))
    with pytest.raises(ConfigError, match=f"no usable checkpoint in .*{name}"):  # the only one: refused
        latest_checkpoint(ck)
    save_checkpoint(ck, 1, {"x": torch.ones(2)}, keep=5)
    with pytest.warns(UserWarning, match=f"skipping checkpoint {name}.*using ckpt-000001"):
        rnd, payload = latest_checkpoint(ck)  # an older good one: skipped with a warning
    assert rnd == 1 and torch.equal(payload["x"], torch.ones(2))
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["tensor byte", "metadata byte", "truncated", "emptied"])
def test_tampered_and_truncated_checkpoints_are_skipped(tmp_path, damage):
    save_checkpoint(tmp_path, 1, {"note": "abc", "x": torch.ones(3)})
    newest = save_checkpoint(tmp_path, 2, {"note": "abc", "x": torch.full((3,), 2.0)})
    data = bytearray(newest.read_bytes())
    if damage == "tensor byte":
        data[-5] ^= 0x01
    elif damage == "metadata byte":
        i = data.index(b"abc")
        data[i:i + 3] = b"abd"
    newest.write_bytes({"truncated": bytes(data[:len(data) // 2]), "emptied": b""}.get(damage, bytes(data)))
    with pytest.warns(UserWarning, match="checksum mismatch" if "byte" in damage else "truncated"):
        rnd, payload = latest_checkpoint(tmp_path)
    assert rnd == 1 and torch.equal(payload["x"], torch.ones(3))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def test_flatten_round_trips_nested_state_exactly_and_refuses_objects():
    t = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    payload = {"a": [t.T, t[:, 1], (torch.ones(2, dtype=torch.bfloat16), torch.tensor([True, False]))],
               "scalars": {"i": 3, "f": 0.1, "b": True, "n": None, "s": "x/y", "nan": float("nan")},
               "empty": torch.zeros(0, 5), "int": torch.tensor(7), "nested": {"": {}, "l": []}}
    back = decode(encode(payload))
    assert same_bits(back["a"][0], t.T) and same_bits(back["a"][1], t[:, 1])
    assert same_bits(back["a"][2][0], payload["a"][2][0]) and same_bits(back["a"][2][1], payload["a"][2][1])
    assert same_bits(back["empty"], payload["empty"]) and same_bits(back["int"], payload["int"])
    s = back["scalars"]
    assert (s["i"], s["f"], s["b"], s["n"], s["s"]) == (3, 0.1, True, None, "x/y") and s["nan"] != s["nan"]
    assert type(s["i"]) is int and type(s["b"]) is bool and back["nested"] == {"": {}, "l": []}
    with pytest.raises(TypeError, match="server/f is a Factors"):
        flatten({"server": {"f": Factors(A=torch.ones(1, 2), B=torch.ones(3, 1))}})


def global_tensors(server: FederatedServer) -> dict[str, torch.Tensor]:
    task = server.global_task()
    out = {f"head.{k}": v for k, v in task.head.items()}
    for kind, factors in (("factors", task.factors), ("base_delta", task.base_delta)):
        for n, f in factors.items():
            out[f"{kind}.{n}.A"], out[f"{kind}.{n}.B"] = f.A, f.B
    return out


def server_of(name: str) -> FederatedServer:
    settings = FSLoRASettings(server_optimizer="adamw", server_lr=0.5) if name == "fslora-adamw" else None
    g = torch.Generator().manual_seed(3)
    head = {"classifier.weight": torch.randn(3, 4, generator=g), "classifier.bias": torch.zeros(3, dtype=torch.float64)}
    privacy = PrivacyConfig(clip_norm="auto", noise_multiplier=1.0, dp_clip=1.0)  # its round count and clip bound
    return FederatedServer(build(name.split("-")[0], settings), head, BUDGETS, EXAMPLES, privacy=privacy)


@pytest.mark.parametrize("name", [*sorted(METHODS), "fslora-adamw"])
def test_every_method_round_trips_bit_for_bit_through_a_checkpoint(tmp_path, name):
    s = server_of(name)
    for rnd, specs in ((1, SPECS[:3]), (2, SPECS[1:])):
        s.strategy.aggregate(rnd, train(s.strategy.configure(rnd, specs), seed=rnd))
    s.dp.rounds, s.adaptive.bound = 2, 0.37
    save_checkpoint(tmp_path, 2, {"round": 2, "server": s.state_dict(), "budgets": BUDGETS})
    rnd, payload = latest_checkpoint(tmp_path)
    t = server_of(name)
    t.load_state_dict(payload["server"])
    assert rnd == 2 and payload["budgets"] == BUDGETS and (t.dp.rounds, t.adaptive.bound) == (2, 0.37)
    assert t.global_task().scale == s.global_task().scale
    a, b = global_tensors(s), global_tensors(t)
    assert a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a), [k for k in a if not same_bits(a[k], b[k])]
    structure_s, tensors_s = flatten(s.state_dict())
    structure_t, tensors_t = flatten(t.state_dict())
    assert structure_s == structure_t and all(same_bits(tensors_s[k], tensors_t[k]) for k in tensors_s)
    tasks = s.strategy.configure(3, SPECS)  # what is not in the global task (moments) round trips too
    again = t.strategy.configure(3, SPECS)
    assert all(same_bits(tasks[c].factors[n].A, again[c].factors[n].A) for c in tasks for n in tasks[c].factors)
    ups = train(tasks, seed=3)
    s.strategy.aggregate(3, ups)
    t.strategy.aggregate(3, ups)
    a, b = global_tensors(s), global_tensors(t)
    assert all(same_bits(a[k], b[k]) for k in a)


def one_error_line(err: str) -> bool:
    """stderr ends in one ``fedlora: error:`` line (after the run's banner), no traceback."""
    lines = err.strip().splitlines()
    return lines[-1].startswith("fedlora: error:") and err.count("error") == 1 and "Traceback" not in err


def test_resume_onto_a_crafted_checkpoint_exits_2_and_runs_nothing(tiny_bert_dir, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    args = ["run", *tiny_overrides(tiny_bert_dir, out, federation__rounds=1), "--quiet"]
    assert main(args) == 0
    for p in list_checkpoints(out / "checkpoints"):
        p.unlink()
    (out / "checkpoints" / "ckpt-000001.pt").write_bytes(crafted("old", marker))
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert one_error_line(err) and "ckpt-000001.pt: an old pickle-based checkpoint" in err
    assert not marker.exists()


def test_resume_with_changed_settings_exits_2_naming_the_keys(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", *tiny_overrides(tiny_bert_dir, out, federation__rounds=1)]
    assert main([*args, "--quiet"]) == 0
    before = {p: p.read_bytes() for p in (out / "config.toml", out / "metrics.jsonl", out / "summary.json")}
    capsys.readouterr()
    assert main([*args, "strategy.alpha=8.0", "--quiet", "--resume"]) == 2
    err = capsys.readouterr().err
    assert one_error_line(err) and "strategy.alpha (16.0 there, 8.0 now)" in err
    assert main([*args, "strategy.alpha=8.0", "seed=3", "data.num_clients=5", "--quiet", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "strategy.alpha" in err and "seed (0 there, 3 now)" in err and "data.num_clients" in err
    assert main([*args, "strategy.global_rank=4", "budgets.ranks=[2, 4]", "--quiet", "--resume"]) == 2
    assert "strategy.global_rank (8 there, 4 now)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before  # nothing was touched


def test_resume_with_more_rounds_continues_to_the_new_count(tiny_bert_dir, tmp_path):
    out, ref = tmp_path / "run", tmp_path / "ref"
    every = {"federation__eval_every": 1}  # the 1-round run evaluates round 1 (its last): so does the reference
    assert main(["run", *tiny_overrides(tiny_bert_dir, out, federation__rounds=1, **every), "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    stale = out / "checkpoints" / "ckpt-000002.safetensors.tmp99999"
    stale.write_bytes(b"left by a killed run")
    assert main(["run", *tiny_overrides(tiny_bert_dir, out, federation__rounds=2, **every), "--quiet", "--resume"]) == 0
    assert main(["run", *tiny_overrides(tiny_bert_dir, ref, federation__rounds=2, **every), "--quiet"]) == 0
    rows = [{k: v for k, v in json.loads(x).items() if k != "wall_time_s"} for x in
            (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows == [{k: v for k, v in json.loads(x).items() if k != "wall_time_s"} for x in
                    (ref / "metrics.jsonl").read_text().splitlines()]
    adapter = "adapter/adapter_model.safetensors"
    assert (out / adapter).read_bytes() == (ref / adapter).read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_aggregated"] == 2
    assert "rounds = 2" in (out / "config.toml").read_text() and not stale.exists()


def test_a_resumed_run_is_unfinished_until_it_ends_and_a_cosine_schedule_keeps_its_rounds(tiny_bert_dir, tmp_path,
                                                                                           monkeypatch, capsys):
    from fedlora import simulate

    out = tmp_path / "run"
    assert main(["run", *tiny_overrides(tiny_bert_dir, out, federation__rounds=1), "--quiet"]) == 0
    real = simulate.train_client

    def dies(exp, rnd, cid, task):
        if rnd == 2:
            raise KeyboardInterrupt  # the resumed run is interrupted in its new round
        return real(exp, rnd, cid, task)

    monkeypatch.setattr(simulate, "train_client", dies)
    assert main(["run", *tiny_overrides(tiny_bert_dir, out, federation__rounds=2), "--quiet", "--resume"]) == 130
    assert not (out / "summary.json").exists()  # the old summary no longer says "finished"
    monkeypatch.undo()
    cosine = tmp_path / "cosine"
    over = {"train__lr_schedule": '"cosine"'}
    assert main(["run", *tiny_overrides(tiny_bert_dir, cosine, federation__rounds=1, **over), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", *tiny_overrides(tiny_bert_dir, cosine, federation__rounds=2, **over), "--quiet",
                 "--resume"]) == 2
    assert "federation.rounds (1 there, 2 now)" in capsys.readouterr().err


def test_a_second_run_on_a_locked_output_directory_exits_2(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                               "from fedlora.outdir import output_lock\n"
                               f"with output_lock(Path({str(out)!r})):\n print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        args = ["run", *tiny_overrides(tiny_bert_dir, out, federation__rounds=1), "--quiet"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert one_error_line(err) and f"is in use by another run (pid {holder.pid})" in err
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock
        holder.wait()
    assert main(args) == 0


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def temps(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob("*") if TEMP.search(p.name)]


def test_a_full_disk_leaves_no_temp_files_and_the_old_files_whole(tmp_path, monkeypatch):
    ck = save_checkpoint(tmp_path / "ck", 1, {"x": torch.ones(2)}).parent
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n')
    task = ClientTask(factors={"q": Factors(A=torch.ones(2, 7), B=torch.ones(9, 2))}, scale=1.0)
    save_peft_adapter(task, tmp_path / "adapter", "base", 16.0)
    (tmp_path / "adapter" / "stale.txt").write_text("from an older export")
    old_adapter = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(ck, 2, {"x": torch.zeros(2)})
    with pytest.raises(OSError, match="No space left"):
        write_atomic(tmp_path / "metrics.jsonl", '{"round": 0}\n{"round": 1}\n')
    with pytest.raises(OSError, match="No space left"):
        save_peft_adapter(task, tmp_path / "adapter", "base", 8.0)
    assert temps(tmp_path) == []
    assert [p.name for p in list_checkpoints(ck)] == ["ckpt-000001.safetensors"]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 0}\n'
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == old_adapter
    monkeypatch.undo()
    save_peft_adapter(task, tmp_path / "adapter", "base", 8.0)  # replaces the folder whole
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    assert temps(tmp_path) == []


def test_a_run_in_which_no_round_was_aggregated_exits_3(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_bert_dir, out, federation__fraction=1.0, reliability__fail_clients="[0, 1, 2, 3]")
    assert main(["run", *args, "--quiet"]) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("fedlora: error: no round was aggregated") and "final accuracy" not in last
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "no_round_aggregated" and summary["rounds_aggregated"] == 0


def test_a_planted_lock_link_is_refused_and_the_file_it_points_at_stays_whole(tmp_path, capsys):
    victim = tmp_path / "precious.txt"
    victim.write_text("the user's own file\n" * 3)
    for kind in ("symlink", "hardlink"):
        out = tmp_path / kind
        out.mkdir()
        (out / LOCK).symlink_to(victim) if kind == "symlink" else os.link(victim, out / LOCK)
        with pytest.raises(ConfigError, match=rf"{kind}: \.fedlora\.lock "
                                              + ("is a symbolic link" if kind == "symlink" else "has 2 hard links")):
            with output_lock(out):
                pass
        assert victim.read_text() == "the user's own file\n" * 3
    assert main(["run", f'output_dir="{tmp_path / "symlink"}"', "--quiet"]) == 2  # refused before any loading
    err = capsys.readouterr().err
    assert one_error_line(err) and ".fedlora.lock is a symbolic link" in err
    assert victim.read_text() == "the user's own file\n" * 3


def test_the_lock_records_the_holder_s_pid_without_truncating(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text("9" * 40)  # longer than a pid record: overwritten in place, not cut
    with output_lock(out):
        assert (out / LOCK).read_text()[:20].strip() == str(os.getpid())
    assert len((out / LOCK).read_text()) == 40


def resolved_config(out: Path) -> str:
    from fedlora.config import load_config, to_toml

    return to_toml(load_config(None, [f'output_dir="{out}"']))


def test_a_fresh_run_refuses_a_non_empty_directory_that_holds_no_run(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "adapter").mkdir(parents=True)
    mine = {out / "notes.txt": "mine", out / "data.tmp123": "mine too", out / "adapter" / "weights.bin": "mine too"}
    for p, text in mine.items():
        p.write_text(text)
    with pytest.raises(ConfigError, match=r"mine is not empty \(adapter, data.tmp123, notes.txt\) and holds no "
                                          r"fedlora run; .* or pass --overwrite"):
        prepare_output_dir(out, overwrite=False, resume=False)
    assert main(["run", f'output_dir="{out}"', "--quiet"]) == 2
    assert one_error_line(capsys.readouterr().err)
    assert {p: p.read_text() for p in mine} == mine and temps(out) == ["data.tmp123"]
    assert prepare_output_dir(out, overwrite=True, resume=False) == 0  # --overwrite: as before
    started = tmp_path / "started"  # a run stopped before its first round left its resolved config: a run
    started.mkdir()
    (started / "config.toml").write_text(resolved_config(started))
    assert prepare_output_dir(started, overwrite=False, resume=False) == 0
    (started / "config.toml").write_text('[train]\nlr = 0.1\n')  # a user's own partial config is not
    with pytest.raises(ConfigError, match=r"is not empty \(config.toml\) and holds no fedlora run"):
        prepare_output_dir(started, overwrite=False, resume=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_output_dir(empty, overwrite=False, resume=False) == 0


@pytest.fixture(scope="module")
def two_rounds(tiny_bert_dir, tmp_path_factory) -> Path:
    """A finished 2-round run (checkpoints of rounds 1 and 2), copied by each test that damages it."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["run", *tiny_overrides(tiny_bert_dir, out, federation__eval_every=1), "--quiet"]) == 0
    return out


def damaged_copy(two_rounds: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(two_rounds, out)
    return out


def resume(tiny_bert_dir, out: Path, rounds: int = 2) -> int:
    return main(["run", *tiny_overrides(tiny_bert_dir, out, federation__eval_every=1, federation__rounds=rounds),
                 "--quiet", "--resume"])


def other_rank(path: Path) -> str:
    """Rewrite the checkpoint at ``path`` (a valid checksum) with one global factor cut to rank 4; its path
    (``server/...``)."""
    payload = read_checkpoint(path)
    _, tensors = flatten(payload)
    key = next(k for k in sorted(tensors) if "/factors/" in k and k.endswith("/A"))
    node = payload
    for part in key.split("/")[:-1]:
        node = node[part]
    node["A"] = node["A"][:4].clone()
    path.write_bytes(encode(payload))
    return key


def test_a_checkpoint_of_another_rank_is_skipped_or_refused_in_one_line(tiny_bert_dir, two_rounds, tmp_path, capsys):
    out = damaged_copy(two_rounds, tmp_path)
    ck = out / "checkpoints"
    key = other_rank(ck / "ckpt-000002.safetensors")
    with pytest.warns(UserWarning, match=rf"skipping checkpoint ckpt-000002.safetensors: {re.escape(key[7:])} is "
                                         r"\(4, 32\) torch.float32 there, \(8, 32\) torch.float32 in this run"
                                         r".*using ckpt-000001"):
        assert resume(tiny_bert_dir, out) == 0  # went on from round 1
    assert [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    for p in list_checkpoints(ck):
        other_rank(p)
    capsys.readouterr()
    assert resume(tiny_bert_dir, out) == 2
    err = capsys.readouterr().err
    assert one_error_line(err) and "no usable checkpoint" in err and "(another rank or model?)" in err


def test_a_renamed_checkpoint_does_not_end_a_resume_early(tiny_bert_dir, two_rounds, tmp_path):
    out = damaged_copy(two_rounds, tmp_path)
    ck = out / "checkpoints"
    (ck / "ckpt-000002.safetensors").rename(ck / "ckpt-000099.safetensors")  # its payload still says round 2
    with pytest.warns(UserWarning, match=r"skipping checkpoint ckpt-000099.safetensors: its payload is round 2 "
                                         r"\(renamed\?\); using ckpt-000001"):
        assert resume(tiny_bert_dir, out, rounds=3) == 0
    assert [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_aggregated"] == 3


@pytest.mark.parametrize("damage, message", [
    ("emptied", r"metrics.jsonl has no evaluation of round 0 \(emptied\?\)"),
    ("bad json", r"metrics.jsonl line 2 is not a metrics row"),
    ("no round", r"metrics.jsonl line 2 is not a metrics row \(a JSON object with an integer 'round'"),
])
def test_resume_with_a_damaged_metrics_file_is_one_line(tiny_bert_dir, two_rounds, tmp_path, capsys, damage, message):
    out = damaged_copy(two_rounds, tmp_path)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = {"emptied": "", "bad json": '{"round": 1, "x": }\n', "no round": '{"rnd": 1}\n'}[damage]
    (out / "metrics.jsonl").write_text("" if damage == "emptied" else "".join(lines))
    capsys.readouterr()
    assert resume(tiny_bert_dir, out) == 2
    err = capsys.readouterr().err
    assert one_error_line(err) and re.search(message, err)


def test_a_checkpoint_whose_payload_names_another_round_is_skipped(tmp_path):
    save_checkpoint(tmp_path, 1, {"round": 1, "x": torch.ones(2)}, keep=5)
    save_checkpoint(tmp_path, 3, {"round": 2, "x": torch.zeros(2)}, keep=5)
    save_checkpoint(tmp_path, 4, {"round": True, "x": torch.zeros(2)}, keep=5)  # a bool is not a round
    with pytest.warns(UserWarning) as seen:
        rnd, payload = latest_checkpoint(tmp_path)
    assert rnd == 1 and torch.equal(payload["x"], torch.ones(2))
    assert [str(w.message).split(";")[0] for w in seen] == [
        "skipping checkpoint ckpt-000004.safetensors: its payload is round True (renamed?)",
        "skipping checkpoint ckpt-000003.safetensors: its payload is round 2 (renamed?)"]
