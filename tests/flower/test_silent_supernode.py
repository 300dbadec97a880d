"""A real SuperNode that takes its task and never answers (its ClientApp sleeps): the round ends
within the grace period after the other replies, not at round-timeout (SuperLink + 3 SuperNodes
on 127.0.0.1; ~25 s on an idle machine, most of it Flower starting a ClientApp process per message)."""

import json
import re
import shlex
import shutil

import pytest
import tomli_w

pytest.importorskip("flwr")

from ..conftest import tiny_overrides  # noqa: E402
from .test_deployment import APP, BIN, free_port, needs_flwr_cli, start, superlink, wait_for  # noqa: E402

SLEEPY = '''"""fedlora's ClientApp, except that a node with node-config `sleep` sleeps that long before training."""
import time

from flwr.clientapp import ClientApp

from fedlora.flower import client_app as real

app = ClientApp()
app.query()(real.profile)


@app.train()
def train(msg, context):
    time.sleep(float(context.node_config.get("sleep", 0)))
    return real.train(msg, context)
'''


@pytest.mark.slow
@needs_flwr_cli
def test_a_silent_supernode_costs_a_round_the_grace_period_not_the_timeout(tiny_bert_dir, tmp_path):
    app = tmp_path / "app"
    shutil.copytree(APP, app)
    (app / "sleepy.py").write_text(SLEEPY)
    pyproject = app / "pyproject.toml"
    pyproject.write_text(re.sub(r'(?m)^clientapp = .*$', 'clientapp = "sleepy:app"', pyproject.read_text()))
    out, grace, timeout = tmp_path / "out", 2.0, 120.0
    overrides = tiny_overrides(tiny_bert_dir, out, data__num_clients=3, federation__fraction=1.0,
                               federation__rounds=1)
    run_config = tmp_path / "run_config.toml"
    run_config.write_text(tomli_w.dumps({"overrides": shlex.join(overrides), "output-dir": str(out), "min-nodes": 3,
                                         "round-timeout": timeout, "round-grace": grace}))
    with superlink(tmp_path) as (env, link_port, procs):
        for i, extra in enumerate(["", "", " sleep=3600"]):
            procs.append(start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                                "--isolation", "subprocess", "--port", str(free_port()),
                                "--node-config", f"partition-id={i}{extra}"], tmp_path / f"node{i}.log", env))
        runner = start([str(BIN / "flwr"), "run", str(app), "local", "--run-config", str(run_config), "--stream"],
                       tmp_path / "run.log", env)
        procs.append(runner)
        wait_for(lambda: runner.poll() is not None or (out / "summary.json").exists(), 400, "the end of the run")
        # the log streams behind the ServerApp: wait for the round's console line (it follows the drop's)
        wait_for(lambda: runner.poll() is not None or "round 1/1" in (tmp_path / "run.log").read_text(), 60,
                 "the round's line in the streamed log")
    log = (tmp_path / "run.log").read_text()
    assert (out / "summary.json").exists(), log[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()[1:]]
    assert [r["dropped_clients"] for r in rows] == [[2]]
    assert re.search(r"round 1: node \d+ \(client 2\) dropped: no reply within 2 s after 2 of 3 answered "
                     r"\(round-grace\)", log), log[-3000:]
    assert rows[0]["wall_time_s"] < timeout  # waiting for the timeout alone would take 120 s
