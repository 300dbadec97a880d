"""A node's long-running worker: the private channel, forwarding any handler through the
ClientApp's mod, a worker that keeps the model loaded across rounds and gives the per-message
ClientApp's adapter, the tokenised-data cache, and ``fedlora node``'s command-line checks."""

import os
import shlex
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fedlora.flower.worker import serve  # noqa: E402
from fedlora.flower.worker_link import WorkerError, listen, worker_mod  # noqa: E402

from ..conftest import minilm_tokenizer_dir, tiny_overrides  # noqa: E402


def echo_app(ran_in: list) -> ClientApp:
    """A ClientApp whose query handler doubles an array, reports its node and run config, counts
    calls in ``context.state`` and records the thread it ran in; ``query.boom`` raises."""
    app = ClientApp(mods=[worker_mod])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        ran_in.append(threading.get_ident())
        calls = int(context.state.config_records.get("s", ConfigRecord({"calls": 0}))["calls"]) + 1
        context.state["s"] = ConfigRecord({"calls": calls})
        x = msg.content.array_records["x"]["t"].numpy()
        return Message(RecordDict({"y": ArrayRecord({"t": torch.from_numpy(2 * x)}),
                                   "who": ConfigRecord({"node": context.node_id, "lr": context.run_config["lr"],
                                                        "keys": ",".join(sorted(context.node_config))})}),
                       reply_to=msg)

    @app.query("boom")
    def boom(msg: Message, context: Context) -> Message:
        raise ValueError("no data here")

    return app


def send(app: ClientApp, node_config: dict, state: RecordDict | None = None, kind: str = "query") -> tuple:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 3, 1  # as in a ClientApp process
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    msg = Message(RecordDict({"x": ArrayRecord({"t": x})}), dst_node_id=7, message_type=kind)
    msg.metadata.__dict__["_message_id"] = "m1"
    ctx = Context(run_id=3, node_id=7, node_config=node_config, state=state or RecordDict(), run_config={"lr": 0.5})
    return app(msg, ctx), ctx


def closed(s: socket.socket) -> bool:
    """The worker hung up (with or without unread bytes left, which makes the close a reset)."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def short_dir():
    """A private folder with a short path (a Unix socket path has at most 107 bytes)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="fw-", dir="/tmp"))
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def test_the_socket_is_private_and_unsafe_places_are_refused(short_dir):
    sock = short_dir / "new" / "w.sock"
    with listen(sock):
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600 and stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        with pytest.raises(ValueError, match="another worker is serving"):
            listen(sock)
    with listen(sock):  # a dead worker's leftover socket is replaced
        pass
    shared = short_dir / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(ValueError, match="writable by you alone"):
        listen(shared / "w.sock")
    with pytest.raises(ValueError, match="longer than 107 bytes"):
        listen(short_dir / ("x" * 120))
    (short_dir / "file").write_text("")
    with pytest.raises(ValueError, match="not a socket"):
        listen(short_dir / "file")


def test_every_handler_runs_in_the_worker_and_gives_what_it_gives_in_process(short_dir):
    ran_in: list[int] = []
    app = echo_app(ran_in)
    direct, direct_ctx = send(app, {"partition-id": 1})
    assert ran_in == [threading.get_ident()]  # no `worker`: this process runs the handler

    sock = short_dir / "w.sock"
    listener = listen(sock)
    server = threading.Thread(target=serve, args=(listener, app, 6), daemon=True)
    server.start()
    state = RecordDict({"s": ConfigRecord({"calls": 4})})
    reply, ctx = send(app, {"partition-id": 1, "worker": str(sock)}, state)
    assert ran_in[-1] != threading.get_ident()  # the worker's thread ran it
    y = reply.content.array_records["y"]["t"].numpy()
    assert np.array_equal(y, direct.content.array_records["y"]["t"].numpy())
    assert np.array_equal(y, 2 * np.arange(6, dtype=np.float32).reshape(2, 3))
    assert dict(reply.content.config_records["who"]) == {"node": 7, "lr": 0.5, "keys": "partition-id"}
    assert ctx.state.config_records["s"]["calls"] == 5  # the state the handler wrote comes back
    assert reply.metadata.reply_to_message_id == "m1"

    with pytest.raises(WorkerError, match="worker: ValueError: no data here"):
        send(app, {"worker": str(sock)}, kind="query.boom")
    for garbage in (struct.pack("!Q", 1 << 40),  # a frame over the header cap
                    struct.pack("!Q", 3) + b"\xff{x",  # a header that is not JSON
                    struct.pack("!Q", 3) + b"[1]" + struct.pack("!Q", 0) * 2):  # JSON, not a header
        with socket.socket(socket.AF_UNIX) as s:  # each request is dropped; the worker goes on
            s.connect(str(sock))
            s.sendall(garbage)
            assert closed(s)
    reply, _ = send(app, {"worker": str(sock)})
    assert np.array_equal(reply.content.array_records["y"]["t"].numpy(), y)
    server.join(timeout=10)
    listener.close()
    with pytest.raises(WorkerError, match="is not running"):
        send(app, {"worker": str(sock)})
    sock.unlink()
    with pytest.raises(WorkerError, match="is not running"):
        send(app, {"worker": str(sock)})


def test_the_per_message_app_imports_no_torch():
    """What a node with a worker pays per message: Python and Flower, not torch and the model."""
    code = "import sys, fedlora.flower.node_app; print([m for m in ('torch', 'transformers') if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.slow
def test_a_worker_loads_the_model_once_and_gives_the_per_message_clientapps_adapter(tiny_bert_dir, tmp_path,
                                                                                    short_dir):
    """3 nodes, 3 rounds of FSLoRA through one worker process: one model load in its log, and the
    adapter of the same run without a worker (to 1e-6). Both runs go through the per-message app
    Flower loads (node_app): without a worker it runs the full ClientApp in process."""
    from fedlora.flower import node_app
    from fedlora.flower.inprocess import InProcessGrid
    from fedlora.flower.run_config import NODE_PARTITION, NODE_WORKER, RUN_CONFIG_FILE, RUN_OVERRIDES, ServerSettings
    from fedlora.flower.server_app import serve as serve_rounds

    sock, log = short_dir / "w.sock", tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "fedlora.flower.worker", "--socket", str(sock)],
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        adapters = {}
        for mode in ("direct", "worker"):
            out = tmp_path / mode
            ov = tiny_overrides(tiny_bert_dir, out, data__num_clients=3, federation__fraction=1.0,
                                federation__rounds=3)
            rc = {RUN_CONFIG_FILE: "", RUN_OVERRIDES: shlex.join(ov)}
            extra = {NODE_WORKER: str(sock)} if mode == "worker" else {}
            grid = InProcessGrid(node_app.app, [{NODE_PARTITION: i, **extra} for i in range(3)], rc)
            if mode == "worker":
                deadline = time.monotonic() + 120
                while "ready on" not in log.read_text():
                    assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
                    time.sleep(0.1)
            serve_rounds(grid, rc, ServerSettings(min_nodes=3, round_timeout=60))
            adapters[mode] = load_file(str(out / "adapter" / "adapter_model.safetensors"))
            rows = (out / "metrics.jsonl").read_text().splitlines()
            assert len(rows) == 4 and '"dropped_clients": []' in rows[-1]
    finally:
        worker.kill()
        worker.wait()
    text = log.read_text()
    assert text.count("loaded model") == 1 and "(load 1)" in text, text
    assert text.count("train (") == text.count("train from node") == 9  # the 3 rounds' tasks all went through it
    a, b = adapters["direct"], adapters["worker"]
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in a.items() if k.endswith("lora_B.weight"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)


def test_the_token_cache_reads_its_entry_and_a_changed_file_misses(tmp_path):
    from transformers import AutoTokenizer

    from fedlora import token_cache
    from fedlora.config.schema import DataConfig
    from fedlora.data import load_dataset
    from fedlora.encoding import encode_classification

    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir())
    calls = []

    def encoder(tokenizer, texts, labels, max_length):
        calls.append(len(texts))
        return encode_classification(tokenizer, texts, labels, max_length)

    data = tmp_path / "rows.csv"
    data.write_text("text,sentiment\n" + "".join(f"row number {i} is {'good' if i % 2 else 'bad'},{i % 2}\n"
                                            for i in range(20)))

    def encode(max_length=16):
        ds = load_dataset(DataConfig(name=str(data)))
        return token_cache.cached_encode(encoder, tok, ds.texts, ds.labels, max_length)

    token_cache.enable(tmp_path / "cache")
    try:
        first, again = encode(), encode()
        assert calls == [20] and len(list((tmp_path / "cache").iterdir())) == 1  # the second load read the cache
        for name in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(getattr(first, name), getattr(again, name))
        direct = encode_classification(tok, load_dataset(DataConfig(name=str(data))).texts,
                                       load_dataset(DataConfig(name=str(data))).labels, 16)
        assert torch.equal(again.input_ids, direct.input_ids) and torch.equal(again.labels, direct.labels)
        encode(max_length=12)
        assert calls == [20, 20]  # another max_length: another entry
        data.write_text(data.read_text().replace("row number 3", "row number three"))
        changed = encode()
        assert calls == [20, 20, 20] and not torch.equal(changed.input_ids, first.input_ids)
        tok.padding_side = "left"  # a tokenizer that pads otherwise is another tokenizer
        encode()
        assert calls == [20, 20, 20, 20]
        next((tmp_path / "cache").iterdir()).write_bytes(b"torn")  # a damaged entry is encoded again
    finally:
        token_cache.enable(None)
    encode()
    assert len(calls) == 5  # off again: encodes every time


@pytest.mark.parametrize("argv, says", [
    (["--superlink", "nohost", "--data", "{data}", "--insecure"], "--superlink: expected HOST:PORT"),
    (["--superlink", "h:1", "--data", "{data}", "--insecure"], "--partition-id: say which client slot"),
    (["--superlink", "h:1", "-p", "0", "--data", "/nonexistent.csv", "--insecure"], "--data: file not found"),
    (["--superlink", "h:1", "-p", "0", "--data", "{data}"], "--root-certificates: give the SuperLink's CA"),
    (["--superlink", "h:1", "-p", "0", "--data", "{data}", "--insecure", "--auth-key", "{data}"],
     "--auth-key: SuperNode auth"),
    (["--superlink", "h:1", "-p", "0", "--data", "{data}", "--insecure", "--budget", "0"], "--budget: a LoRA rank"),
    (["--superlink", "h:1", "-p", "0", "--insecure", "--poll-interval", "0"], "--poll-interval: between 0.01"),
])
def test_fedlora_node_refuses_a_bad_command_line_in_one_line(tmp_path, capsys, argv, says):
    from fedlora.cli import main

    data = tmp_path / "d.csv"
    data.write_text("text,label\na,0\n")
    argv = [{"-p": "--partition-id"}.get(a, a) for a in argv]
    assert main(["node", *[a.format(data=data) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err


def test_the_node_config_names_the_worker_and_the_nodes_own_settings(tmp_path):
    from fedlora.flower.node_command import NodeSpec, node_config

    data = tmp_path / "d.csv"
    spec = NodeSpec(superlink="h:1", data=str(data), budget=8, device="cuda:0", insecure=True)
    assert node_config(spec) == {"budget": 8, "device": "cuda:0", "data-path": str(data.resolve())}
    assert node_config(NodeSpec(superlink="h:1", partition_id=0, insecure=True)) == {"partition-id": 0}
    assert os.path.isabs(node_config(NodeSpec("h:1", data="rel.csv"))["data-path"])


@pytest.mark.slow
def test_fedlora_nodes_keep_their_models_and_a_killed_worker_costs_its_node_one_round(tiny_bert_dir, tmp_path):
    """A SuperLink and 2 `fedlora node`s (worker + SuperNode each) on 127.0.0.1, 3 rounds via `flwr run`.
    Node 1's worker is SIGKILLed in the middle of its round-1 task (while it loads the model): that round
    drops client 1 with one line in the server's log, `fedlora node` restarts the worker and client 1 trains
    in rounds 2 and 3. Node 0's worker loads the model once. SIGTERM then stops each node with its worker
    and SuperNode."""
    import json
    import re
    import signal

    import tomli_w

    from .test_deployment import APP, BIN, needs_flwr_cli, start, superlink, wait_for

    if needs_flwr_cli.args[0]:
        pytest.skip("flwr CLI not installed")
    out = tmp_path / "out"
    overrides = tiny_overrides(tiny_bert_dir, out, data__num_clients=2, federation__fraction=1.0,
                               federation__rounds=3)
    logs = [tmp_path / f"node{i}.log" for i in (0, 1)]
    with superlink(tmp_path) as (env, link_port, procs):
        nodes = [start([str(BIN / "fedlora"), "node", "--superlink", f"127.0.0.1:{link_port}", "--insecure",
                        "--partition-id", str(i), "--budget", str(4 * (i + 1)), "--poll-interval", "0.2",
                        "--cache-dir", str(tmp_path / "cache")], logs[i], env)
                 for i in (0, 1)]
        procs += nodes
        run_config = tmp_path / "run_config.toml"
        run_config.write_text(tomli_w.dumps({"overrides": shlex.join(overrides), "output-dir": str(out),
                                             "min-nodes": 2, "round-timeout": 120.0}))
        runner = start([str(BIN / "flwr"), "run", str(APP), "local", "--run-config", str(run_config), "--stream"],
                       tmp_path / "run.log", env)
        procs.append(runner)

        def trains(i: int) -> int:
            if runner.poll() is not None and not (out / "summary.json").exists():
                raise RuntimeError("flwr run ended early:\n" + (tmp_path / "run.log").read_text()[-3000:])
            return len(re.findall(r"fedlora worker: train \(run \d+\): started", logs[i].read_text()))

        wait_for(lambda: trains(1) >= 1, 240, "node 1's round-1 task")
        pid = int(re.findall(r"fedlora worker: ready on \S+ \(pid (\d+)\)", logs[1].read_text())[-1])
        assert "loaded model" not in logs[1].read_text()  # still loading: the kill lands mid-task
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: (out / "summary.json").exists(), 240, "the end of the run")
        # the log streams behind the ServerApp: wait for the last round's console line
        wait_for(lambda: "round 3/3" in (tmp_path / "run.log").read_text(), 60, "the last round's line")
        for node in nodes:
            node.send_signal(signal.SIGTERM)
        for node in nodes:
            assert node.wait(timeout=30) == 0
        text = [log.read_text() for log in logs]
        children = [int(p) for t in text for p in re.findall(r"worker pid (\d+), SuperNode pid (\d+)", t)[0]]
        children += [int(p) for p in re.findall(r"ready on \S+ \(pid (\d+)\)", text[1])]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["dropped_clients"] for r in rows[1:]] == [[1], [], []]  # dropped in round 1 only
    run_log = (tmp_path / "run.log").read_text()
    assert len(re.findall(r"round 1: node \d+ \(client 1\) dropped: .*worker", run_log)) == 1, run_log[-3000:]
    assert len(re.findall(r"\) dropped: ", run_log)) == 1, run_log[-3000:]  # no other node dropped, any round
    assert "round 1/3: clients answered 1, dropped 1" in run_log, run_log[-3000:]
    assert "round 2/3: clients answered 2, dropped 0" in run_log, run_log[-3000:]
    assert "the worker died" in text[1] and text[1].count("fedlora worker: ready on") == 2
    assert "train (run" in text[1] and "left by the previous worker: failed" in text[1]  # answered at once
    done = r"fedlora worker: train \(run \d+\) \(pull"
    assert text[1].count("loaded model") == 1 and len(re.findall(done, text[1])) == 2  # the restarted one
    assert text[0].count("loaded model") == 1 and "(load 1)" in text[0]  # 3 rounds, one load
    assert len(re.findall(done, text[0])) == 3
    for pid in children:  # SIGTERM left no orphan behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _fab(clientapp: str) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pyproject.toml", '[project]\nname = "x"\nversion = "1.0.0"\n[tool.flwr.app]\npublisher = "p"\n'
                   f'[tool.flwr.app.components]\nserverapp = "a:b"\nclientapp = "{clientapp}"\n')
    return buf.getvalue()


def test_a_node_runs_only_fedloras_own_clientapp():
    from fedlora.flower.node_executor import fedlora_app

    assert fedlora_app(_fab("fedlora.flower.node_app:app")) == "fedlora.flower.node_app:app"
    assert fedlora_app(_fab("fedlora.flower.client_app:app")) == "fedlora.flower.client_app:app"
    with pytest.raises(ValueError, match="not fedlora's"):
        fedlora_app(_fab("evil.app:app"))


def test_the_supernode_launcher_caps_flowers_idle_waits():
    """fedlora node's SuperNode: Flower 1.41's fixed 3 s idle sleep and 1 s object-pull back-off capped."""
    import functools
    import time

    from flwr.supernode import start_client_internal as loop

    from fedlora.flower.supernode_launch import capped_time, patch

    clock = capped_time(0.01)
    t0 = time.perf_counter()
    clock.sleep(3)
    assert time.perf_counter() - t0 < 1 and clock.monotonic is time.monotonic
    saved = loop.time, loop.pull_objects
    try:
        assert patch(0.2)
        assert isinstance(loop.pull_objects, functools.partial)
        assert loop.pull_objects.keywords["backoff_cap"] == 0.2 and loop.pull_objects.keywords["initial_backoff"] <= 0.2
        t0 = time.perf_counter()
        loop.time.sleep(3)
        assert time.perf_counter() - t0 < 1
        assert not patch(0.2)  # patched once: a second call finds no pristine module and leaves it
    finally:
        loop.time, loop.pull_objects = saved


def test_the_worker_takes_one_way_to_receive_messages(capsys):
    from fedlora.flower.worker import main

    for argv in ([], ["--socket", "/tmp/x.sock", "--runtime-api", "127.0.0.1:1"], ["--runtime-api", "127.0.0.1:1"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "--runtime-api needs --secret-file" in capsys.readouterr().err
