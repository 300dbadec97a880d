"""`flwr run` for real: a local deployment (SuperLink + 3 SuperNodes as separate processes on
127.0.0.1; one SuperNode is killed mid-run) and the simulation
engine (the example app's config works there too and gives the simulator's adapter).
Bounded in time; every process is stopped at the end."""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")

from ..conftest import tiny_overrides  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "examples" / "flower_app"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, log: Path, env) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # own process group: killed as a whole


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


needs_flwr_cli = pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None,
                                    reason="flwr CLI not installed")


@contextmanager
def superlink(tmp_path: Path, *flags: str, certs: Path | None = None):
    """A SuperLink on a free loopback port that uses this environment (no `uv sync`), and a
    FLWR_HOME whose default connection points at it; with ``certs`` (from
    examples/flower_certs.py) over TLS and admitting only SuperNodes registered with
    `flwr supernode register`. Yields (env, port, procs): every process appended to
    ``procs`` is killed, with its process group, on exit."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(tmp_path / "flwr-home")}
    link_port = free_port()
    (tmp_path / "flwr-home").mkdir()
    security = f'root-certificates = "{certs / "ca.crt"}"' if certs else "insecure = true"
    (tmp_path / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link_port}"\n{security}\n')
    tls = ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
           "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth"] if certs else ["--insecure"]
    procs = []
    try:
        procs.append(start([str(BIN / "flower-superlink"), *tls, "--isolation", "subprocess",
                            "--disable-runtime-dependency-installation", "--port", str(link_port),
                            "--database", str(tmp_path / "state.db"), *flags], tmp_path / "superlink.log", env))
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", link_port)) == 0, 60, "the SuperLink")
        yield env, link_port, procs
    finally:
        for p in reversed(procs):
            stop(p)


@pytest.mark.slow
@needs_flwr_cli
def test_local_deployment_survives_a_killed_supernode(tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    overrides = tiny_overrides(tiny_bert_dir, out, data__num_clients=3, federation__fraction=1.0,
                               federation__rounds=3, federation__eval_every=1)
    with superlink(tmp_path) as (env, link_port, procs):
        for i, budget in enumerate([2, 4, 8]):
            procs.append(start([str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                f"127.0.0.1:{link_port}", "--isolation", "subprocess", "--port", str(free_port()),
                                "--node-config", f"partition-id={i} budget={budget}"],
                               tmp_path / f"node{i}.log", env))
        run_config = tmp_path / "run_config.toml"  # a file: no quoting rules to fight
        run_config.write_text(tomli_w.dumps({"overrides": shlex.join(overrides), "output-dir": str(out),
                                             "min-nodes": 3, "round-timeout": 60.0}))
        runner = start([str(BIN / "flwr"), "run", str(APP), "local", "--run-config", str(run_config),
                        "--stream"], tmp_path / "run.log", env)
        procs.append(runner)

        def rounds_done() -> int:
            if runner.poll() is not None and not (out / "summary.json").exists():
                raise RuntimeError("flwr run ended early:\n" + (tmp_path / "run.log").read_text()[-3000:])
            path = out / "metrics.jsonl"
            return len(path.read_text().splitlines()) - 1 if path.exists() else 0

        # kill SuperNode 2 (budget 8) once round 1 is done
        wait_for(lambda: rounds_done() >= 1, 240, "round 1")
        stop(procs[3])
        wait_for(lambda: (out / "summary.json").exists() or rounds_done() < 0, 300, "the end of the run")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["dropped_clients"] == [] and all(r["dropped_clients"] == [2] for r in rows[2:])
    log = (tmp_path / "run.log").read_text()
    named = re.findall(r"round 2: node (\d+) \(client 2\) dropped", log)
    assert named and named[0] != "1", log[-2000:]  # the killed node, not the SuperLink reporting it
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())


@pytest.mark.slow
@needs_flwr_cli
def test_flwr_run_on_the_simulation_engine_gives_the_simulators_adapter(tiny_bert_dir, tmp_path):
    pytest.importorskip("ray", reason="the simulation engine needs flwr[simulation] (pip install fedlora[flower])")
    from fedlora.config import default_config_path, load_config
    from fedlora.runner import run
    from fedlora.simulate import simulate_round

    kw = dict(data__num_clients=3, federation__fraction=1.0, federation__rounds=2)
    sim = load_config(default_config_path(), tiny_overrides(tiny_bert_dir, tmp_path / "sim", **kw))
    run(sim, simulate_round, progress=False)
    out = tmp_path / "flower"
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    with superlink(tmp_path, "--simulation") as (env, _, procs):
        run_config = tmp_path / "run_config.toml"  # no budget in node-config: the config's draw
        run_config.write_text(tomli_w.dumps({"overrides": shlex.join(tiny_overrides(tiny_bert_dir, out, **kw)),
                                             "output-dir": str(out), "min-nodes": 3, "round-timeout": 60.0}))
        procs.append(start([str(BIN / "flwr"), "run", str(APP), "local", "--run-config", str(run_config),
                            "--federation-config", "num-supernodes=3", "--stream"], tmp_path / "run.log",
                           {**env, "RAY_TMPDIR": ray_tmp}))
        try:
            procs[-1].wait(timeout=240)
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    assert (out / "summary.json").exists(), (tmp_path / "run.log").read_text()[-3000:]
    a = load_file(str(tmp_path / "sim" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


def supernode(link_port: int, i: int, node_config: str, log: Path, env, certs: Path) -> subprocess.Popen:
    """A SuperNode over TLS that signs its requests with ``certs/node<i>``."""
    return start([str(BIN / "flower-supernode"), "--root-certificates", str(certs / "ca.crt"), "--superlink",
                  f"127.0.0.1:{link_port}", "--auth-supernode-private-key", str(certs / f"node{i}"),
                  "--isolation", "subprocess", "--port", str(free_port()), "--node-config", node_config], log, env)


def flwr(env, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@needs_flwr_cli
def test_secure_deployment_admits_only_registered_supernodes(tiny_bert_dir, tmp_path):
    """TLS (a CA and certificates made at test time) and SuperNode authentication: two registered
    SuperNodes train 2 rounds; a SuperNode whose key was not registered is refused by the SuperLink.
    Then a ServerApp that fails: `flwr run` still returns 0; `flwr ls` says finished:failed and why."""
    import runpy

    certs = tmp_path / "certs"
    runpy.run_path(str(APP.parent / "flower_certs.py"))["main"]([str(certs), "--nodes", "3"])
    registry = tmp_path / "clients.toml"  # the server's list: which key holds which client, its cap
    keys = [(certs / f"node{i}.pub").read_text().strip() for i in (0, 1)]
    registry.write_text("".join(f'[[client]]\npartition_id = {i}\npublic_key = "{keys[i]}"\nbudget = {b}\n\n'
                                for i, b in ((0, 4), (1, 2))))
    out = tmp_path / "out"
    overrides = tiny_overrides(tiny_bert_dir, out, data__num_clients=2, federation__fraction=1.0,
                               federation__rounds=2, federation__eval_every=1)
    run_config = tmp_path / "run_config.toml"
    run_config.write_text(tomli_w.dumps({"overrides": shlex.join(overrides), "output-dir": str(out),
                                         "min-nodes": 2, "round-timeout": 60.0, "registry": str(registry)}))
    with superlink(tmp_path, certs=certs) as (env, link_port, procs):
        for i in (0, 1):
            reg = flwr(env, "supernode", "register", str(certs / f"node{i}.pub"), "local")
            assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr
        procs += [supernode(link_port, 0, "partition-id=0 budget=8", tmp_path / "node0.log", env, certs),
                  supernode(link_port, 1, "partition-id=1", tmp_path / "node1.log", env, certs)]
        stranger = supernode(link_port, 2, "partition-id=1", tmp_path / "node2.log", env, certs)
        procs.append(stranger)
        runner = start([str(BIN / "flwr"), "run", str(APP), "local", "--run-config", str(run_config), "--stream"],
                       tmp_path / "run.log", env)
        procs.append(runner)
        wait_for(lambda: stranger.poll() is not None, 60, "the unregistered SuperNode to be refused")
        wait_for(lambda: runner.poll() is not None, 300, "the end of the run")
        log = (tmp_path / "run.log").read_text()
        assert (out / "summary.json").exists(), log[-3000:]

        bad = tmp_path / "bad_run_config.toml"  # a ServerApp that fails: its registry file is missing
        bad.write_text(tomli_w.dumps({"overrides": shlex.join(overrides), "output-dir": str(tmp_path / "bad"),
                                      "min-nodes": 2, "registry": str(tmp_path / "missing.toml")}))
        failed = flwr(env, "run", str(APP), "local", "--run-config", str(bad), "--stream", timeout=120)
        run_id = re.search(r"Successfully started run (\d+)", failed.stdout).group(1)
        listed = json.loads(flwr(env, "ls", "local", "--run-id", run_id, "--format", "json").stdout)["runs"][0]
    assert stranger.returncode != 0 and "Failed to activate SuperNode" in (tmp_path / "node2.log").read_text()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["dropped_clients"] == [] for r in rows[1:])
    assert json.loads((out / "clients.json").read_text())["budgets"] == [4, 2]  # node 0's 8 capped at 4
    assert re.search(r"registered clients \(client: node, budget\): \{0: \(\d+, 4\), 1: \(\d+, 2\)\}", log), log[-3000:]
    assert failed.returncode == 0  # Flower's: `flwr run` reports the start, not the outcome
    assert listed["status"] == "finished:failed", listed
    assert "fedlora run failed: ConfigError: registry file not found" in listed["status-details"], listed
    assert "fedlora run failed: ConfigError: registry file not found" in failed.stdout + failed.stderr
