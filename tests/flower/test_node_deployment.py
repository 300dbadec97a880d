"""Acceptance 1 for real: a SuperLink and 3 SuperNodes on loopback, each organisation with its own
file in its own folder (JSONL, parquet, CSV; other rows, other label mixes); the ServerApp's config
names a data file that does not exist; 2 rounds complete and each node read only its own file."""

import json
import re
import shlex

import pytest
import tomli_w

pytest.importorskip("flwr")

from ..conftest import tiny_overrides  # noqa: E402
from .test_deployment import APP, BIN, free_port, needs_flwr_cli, start, superlink, wait_for  # noqa: E402
from .test_node_data import LABELS, write_rows  # noqa: E402


@pytest.mark.slow
@needs_flwr_cli
def test_three_organisations_train_on_their_own_files(tiny_bert_dir, tmp_path):
    mixes = {"train.jsonl": (24, ["negative", "neutral", "positive"]), "train.parquet": (18, ["negative"]),
             "train.csv": (12, ["positive", "neutral"])}
    files = []
    for i, (name, (n, labels)) in enumerate(mixes.items()):
        (tmp_path / f"org{i}").mkdir()
        files.append(tmp_path / f"org{i}" / name)
        write_rows(files[-1], [{"text": f"org {i} says thing {j}", "sentiment": labels[j % len(labels)]}
                               for j in range(n)])
    out = tmp_path / "out"
    overrides = tiny_overrides(tiny_bert_dir, out, data__num_clients=3, federation__fraction=1.0,
                               federation__rounds=2, data__name=f'"{tmp_path / "coordinator" / "none.jsonl"}"',
                               data__labels=LABELS, eval__where='"clients"')
    with superlink(tmp_path) as (env, link_port, procs):
        for i, f in enumerate(files):
            procs.append(start([str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                f"127.0.0.1:{link_port}", "--isolation", "subprocess", "--port", str(free_port()),
                                "--node-config", f'partition-id={i} budget={2 * (i + 1)} data-path="{f}"'],
                               tmp_path / f"node{i}.log", env))
        run_config = tmp_path / "run_config.toml"
        run_config.write_text(tomli_w.dumps({"overrides": shlex.join(overrides), "output-dir": str(out),
                                             "min-nodes": 3, "round-timeout": 120.0, "node-data": True}))
        runner = start([str(BIN / "flwr"), "run", str(APP), "local", "--run-config", str(run_config), "--stream"],
                       tmp_path / "run.log", env)
        procs.append(runner)

        def ended() -> bool:
            if runner.poll() is not None and not (out / "summary.json").exists():
                raise RuntimeError("flwr run ended early:\n" + (tmp_path / "run.log").read_text()[-3000:])
            return (out / "summary.json").exists()

        wait_for(ended, 540, "the end of the run")
        # the ServerApp logs its last round line after the runner's summary: wait for it to stream
        wait_for(lambda: "round 2/2" in (tmp_path / "run.log").read_text(), 60, "the last round's line")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(sorted(r["answered_clients"]) == [0, 1, 2] for r in rows[1:])
    assert set(rows[-1]["eval_clients"]) == {"0", "1", "2"}
    for i, (f, (n, _)) in enumerate(zip(files, mixes.values())):
        read = re.findall(r"node: read (\d+) rows from (\S+)", (tmp_path / f"node{i}.log").read_text())
        assert read and set(read) == {(str(n), str(f))}, read  # its own file, every time, and no other
    log = (tmp_path / "run.log").read_text()
    assert re.search(r"round 2/2: clients answered 3, dropped 0, rejected 0, train loss [\d.]+, accuracy", log), \
        log[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["never_contributed"] == []
