"""``fedlora node``: one organisation's side of a deployment in one command.

It starts the node's worker (:mod:`.worker`, which keeps the base model and the tokenised data
loaded for the whole federation) and a ``flower-supernode`` from the same environment in
``--isolation process``, whose task executor the worker is (:mod:`.node_executor`: no process per
message), with a fresh SuperExec secret that only the two share and a node-config naming the
node's data, budget and device; says what the node holds once the worker is up; restarts the
worker when it dies (the node loses the round in flight, not the run); and stops both, with their
process groups, on Ctrl-C or SIGTERM.
Imports no Flower module until it runs: the command line works without Flower installed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from ..errors import ConfigError

RESTARTS, RESTART_WINDOW = 5, 60.0  # more worker deaths than this within the window: stop and report
GRACE = 10.0  # seconds SIGTERM has before SIGKILL


@dataclass(frozen=True)
class NodeSpec:
    superlink: str  # HOST:PORT of the SuperLink's Fleet API
    data: str = ""
    eval_data: str = ""
    partition_id: int | None = None
    budget: int | None = None
    device: str = ""
    root_certificates: str = ""
    auth_key: str = ""
    insecure: bool = False
    port: int = 0  # the SuperNode's Runtime API port on 127.0.0.1 (the worker's only peer); 0: a free one
    cache_dir: str = ""  # tokenised-data cache; "": ~/.cache/fedlora/tokens
    poll_interval: float = 0.2  # the SuperNode's idle wait between asking the SuperLink for work (Flower: 3 s)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's Fleet API address")
    p.add_argument("--data", default="", metavar="PATH", help="this node's training data (any file data.name "
                   "accepts); it never leaves the node")
    p.add_argument("--eval-data", default="", metavar="PATH", help="this node's held-out data (optional)")
    p.add_argument("--partition-id", type=int, default=None, metavar="N",
                   help="this node's client slot in the run (0..data.num_clients-1, as the coordinator assigns it; "
                   "without --data: the client of the run's own split it trains, for trials and benchmarks)")
    p.add_argument("--budget", type=int, default=None, metavar="RANK", help="the LoRA rank this node can afford")
    p.add_argument("--device", default="", help="where the worker trains: cpu, cuda, cuda:N, mps "
                   "(default: the run's train.device)")
    p.add_argument("--root-certificates", default="", metavar="CA.pem",
                   help="the CA that signed the SuperLink's TLS certificate")
    p.add_argument("--auth-key", default="", metavar="KEY", help="this node's private key for SuperNode "
                   "authentication (flower-supernode --auth-supernode-private-key); register its .pub with the "
                   "coordinator")
    p.add_argument("--insecure", action="store_true", help="no TLS (a trial on a trusted network only)")
    p.add_argument("--port", type=int, default=0, help="the SuperNode's Runtime API port on 127.0.0.1, which only "
                   "the worker uses (default: a free one)")
    p.add_argument("--poll-interval", type=float, default=0.2, metavar="S",
                   help="seconds an idle node waits before asking the SuperLink for work again (default: "
                   "%(default)s; Flower's own SuperNode waits 3 s, which a small job's every round pays)")
    p.add_argument("--cache-dir", default="", help="tokenised-data cache (default: ~/.cache/fedlora/tokens)")


def spec_from_args(args: argparse.Namespace) -> NodeSpec:
    spec = NodeSpec(**{f: getattr(args, f) for f in NodeSpec.__dataclass_fields__})
    check_spec(spec)
    return spec


def check_spec(spec: NodeSpec) -> None:
    """Every mistake a node's operator can make on the command line, as one ConfigError."""
    if shutil.which("flower-supernode", path=str(Path(sys.executable).parent)) is None:
        raise ConfigError("fedlora node: Flower is not installed in this environment (pip install 'fedlora[flower]')")
    host, _, port = spec.superlink.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--superlink: expected HOST:PORT, got {spec.superlink!r}")
    if spec.partition_id is None:
        raise ConfigError("--partition-id: say which client slot of the run this node holds (0..data.num_clients-1, "
                          "as the coordinator assigns it)")
    for flag, path in (("--data", spec.data), ("--eval-data", spec.eval_data),
                       ("--root-certificates", spec.root_certificates), ("--auth-key", spec.auth_key)):
        if path and not Path(path).exists():
            raise ConfigError(f"{flag}: file not found: {path}")
    if spec.insecure == bool(spec.root_certificates):
        raise ConfigError("--root-certificates: give the SuperLink's CA (TLS), or --insecure for a trial, not both")
    if spec.auth_key and spec.insecure:
        raise ConfigError("--auth-key: SuperNode authentication needs TLS (--root-certificates), not --insecure")
    if spec.budget is not None and spec.budget < 1:
        raise ConfigError(f"--budget: a LoRA rank of at least 1, got {spec.budget}")
    if spec.partition_id is not None and spec.partition_id < 0:
        raise ConfigError(f"--partition-id: at least 0, got {spec.partition_id}")
    if not 0.01 <= spec.poll_interval <= 60:
        raise ConfigError(f"--poll-interval: between 0.01 and 60 seconds, got {spec.poll_interval}")


def node_config(spec: NodeSpec) -> dict:
    """The SuperNode's node-config: what the ClientApp in the worker reads."""
    from .run_config import NODE_BUDGET, NODE_DATA, NODE_DEVICE, NODE_EVAL_DATA, NODE_PARTITION  # Flower: when used

    cfg: dict = {}
    for key, value in ((NODE_PARTITION, spec.partition_id), (NODE_BUDGET, spec.budget), (NODE_DEVICE, spec.device),
                       (NODE_DATA, _abs(spec.data)), (NODE_EVAL_DATA, _abs(spec.eval_data))):
        if value not in (None, ""):
            cfg[key] = value
    return cfg


def _abs(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class NodeFiles:
    """What the node's two processes share, in a private (0700) directory of this run."""
    folder: Path
    port: int  # the SuperNode's Runtime API on 127.0.0.1

    @property
    def secret(self) -> Path:  # the SuperExec secret: whoever holds it can take the node's tasks
        return self.folder / "superexec.secret"

    @property
    def ready(self) -> Path:  # the worker creates it once its checks passed
        return self.folder / "worker.ready"

    @property
    def node_config(self) -> Path:
        return self.folder / "node-config.toml"


def supernode_command(spec: NodeSpec, files: NodeFiles) -> list[str]:
    security = ["--insecure"] if spec.insecure else ["--root-certificates", spec.root_certificates]
    if spec.auth_key:
        security += ["--auth-supernode-private-key", spec.auth_key]
    return [sys.executable, "-m", "fedlora.flower.supernode_launch", str(spec.poll_interval), *security,
            "--superlink", spec.superlink, "--isolation", "process", "--host", "127.0.0.1", "--port", str(files.port),
            "--superexec-auth-secret-file", str(files.secret), "--node-config", str(files.node_config)]


def worker_command(spec: NodeSpec, files: NodeFiles) -> list[str]:
    cache = spec.cache_dir or str(Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "fedlora/tokens")
    return [sys.executable, "-m", "fedlora.flower.worker", "--runtime-api", f"127.0.0.1:{files.port}",
            "--secret-file", str(files.secret), "--ready-file", str(files.ready), "--data", _abs(spec.data),
            "--device", spec.device, "--cache-dir", cache]


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when ``fedlora node`` dies, even by SIGKILL, so no
    worker or SuperNode outlives it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the signal handlers below still stop both
        pass


def _start(cmd: list[str], env: dict) -> subprocess.Popen:
    # its own group (stopped as a whole), and it dies with this process
    return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, GRACE), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_ready(worker: subprocess.Popen, ready: Path, timeout: float = 600.0) -> bool:
    """True once the worker's checks passed; False if it exits first."""
    deadline = time.monotonic() + timeout
    while worker.poll() is None and time.monotonic() < deadline:
        if ready.exists():
            return True
        time.sleep(0.1)
    return False


def say(text: str) -> None:
    print(f"fedlora node: {text}", flush=True)


def run_node(spec: NodeSpec) -> int:
    """Start, supervise and stop the worker and the SuperNode; the exit status of the node."""
    files = NodeFiles(Path(tempfile.mkdtemp(prefix="fedlora-node-")), spec.port or _free_port())  # mkdtemp: 0700
    files.node_config.write_text(tomli_w.dumps(node_config(spec)))
    fd = os.open(files.secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: stop.append(s))
    worker = supernode = None
    deaths: list[float] = []
    try:
        worker = _start(worker_command(spec, files), env)
        if not _wait_ready(worker, files.ready):
            if stop:
                return 0
            say(f"the worker did not start (exit {worker.poll()}); see its line above")
            return 2 if worker.poll() == 2 else 1
        say(f"holds {spec.data or f'client {spec.partition_id} of the shared split'}; budget "
            f"{spec.budget or 'from the run config'}; device {spec.device or 'from the run config'}; "
            f"SuperNode -> {spec.superlink}, its tasks run in the worker (Runtime API 127.0.0.1:{files.port})")
        supernode = _start(supernode_command(spec, files), env)
        say(f"worker pid {worker.pid}, SuperNode pid {supernode.pid}")
        while not stop:
            if supernode.poll() is not None:
                say(f"the SuperNode exited ({supernode.returncode}); stopping the worker")
                return supernode.returncode or 1
            if worker.poll() is not None:
                now = time.monotonic()
                deaths = [t for t in deaths if now - t < RESTART_WINDOW] + [now]
                if len(deaths) > RESTARTS:
                    say(f"the worker died {len(deaths)} times within {RESTART_WINDOW:.0f} s (last exit "
                        f"{worker.returncode}); stopping the node")
                    return 1
                say(f"the worker died (exit {worker.returncode}); the round in flight is lost; restarting it")
                files.ready.unlink(missing_ok=True)
                worker = _start(worker_command(spec, files), env)
            time.sleep(0.2)
        say("stopping (signal)")
        return 0
    finally:
        _stop(supernode)
        _stop(worker)
        shutil.rmtree(files.folder, ignore_errors=True)
