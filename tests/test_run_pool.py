"""`--jobs`: runs side by side in worker processes give the one-job results, and a failure stops them."""

import json
import multiprocessing
import os
import signal
import threading
import time

import pytest

from fedlora.cli import main
from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.outdir import output_lock
from fedlora.run_pool import PendingRun, execute

from .conftest import tiny_overrides


def _finals(out, names):
    return {n: json.loads((out / f"{n}-seed0" / "summary.json").read_text()) for n in names}


def test_two_jobs_give_the_one_job_results(tiny_bert_dir, tmp_path, capsys):
    methods = ["fslora", "flexlora"]
    finals = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        args = ["compare", *tiny_overrides(tiny_bert_dir, out), "--methods", ",".join(methods), "--seeds", "0",
                "--out", str(out), "--jobs", str(jobs)]
        assert main(args) == 0
        finals[jobs] = _finals(out, methods)
        assert (out / "results.md").is_file()
    err = capsys.readouterr().err
    assert "2 runs, 2 at a time" in err and "run [2/2] done" in err
    for m in methods:  # one thread against two sum in another order: equal to float rounding
        one, two = finals[1][m], finals[2][m]
        assert two["final_accuracy"] == pytest.approx(one["final_accuracy"], abs=1 / 60)
        assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)


def test_a_failing_run_raises_its_error_and_the_rest_do_not_start(tiny_bert_dir, tmp_path):
    runs = [PendingRun(load_config(None, tiny_overrides(tiny_bert_dir, tmp_path / name)), name)
            for name in ("busy", "good", "later0", "later1", "later2", "later3")]
    with output_lock(tmp_path / "busy"):  # the first run fails at once: its directory is in use
        with pytest.raises(ConfigError, match="is in use by another run"):
            execute(runs, jobs=2, progress=False)
    finished = [p.label for p in runs if (tmp_path / p.label / "summary.json").exists()]
    assert finished == ["good"]  # the run going beside it finished; none started after the failure


@pytest.mark.parametrize("command", ["compare", "study"])
def test_jobs_below_one_is_one_line(command, capsys):
    assert main([command, "--jobs", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--jobs: must be at least 1, got 0") and "\n" not in err


def test_a_worker_the_system_kills_is_one_line_naming_the_runs_it_stopped(tiny_bert_dir, tmp_path):
    endless = {"federation__rounds": 100_000}  # neither run can finish before the kill
    runs = [PendingRun(load_config(None, tiny_overrides(tiny_bert_dir, tmp_path / name, **endless)), name)
            for name in ("first", "second")]
    failure: list[BaseException] = []

    def go():
        try:
            execute(runs, jobs=2, progress=False)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            failure.append(e)

    thread = threading.Thread(target=go)
    thread.start()
    deadline = time.monotonic() + 300
    while not all((tmp_path / n / "metrics.jsonl").exists() for n in ("first", "second")):
        assert time.monotonic() < deadline, "the two runs did not start"
        time.sleep(0.2)
    os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)  # as the OOM killer would
    thread.join(timeout=300)
    assert not thread.is_alive() and len(failure) == 1
    message = str(failure[0])
    assert isinstance(failure[0], ConfigError) and "a worker process died" in message
    assert "runs stopped: " in message and "first" in message and "second" in message  # the pool stops both


def test_a_worker_that_dies_while_starting_is_one_line():
    from concurrent.futures import ProcessPoolExecutor

    from fedlora.run_pool import _start_workers

    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, initializer=os._exit, initargs=(1,)) as pool:
        with pytest.raises(ConfigError, match="a worker process died while starting"):
            _start_workers(pool, 1)


def test_a_dead_pool_also_names_a_run_that_failed_just_before(tiny_bert_dir, tmp_path):
    from fedlora.run_pool import _pool_died

    first, second = (PendingRun(load_config(None, tiny_overrides(tiny_bert_dir, tmp_path / n)), n)
                     for n in ("first", "second"))
    message = str(_pool_died([second], [(first, RuntimeError("terminated"))]))
    assert "runs stopped: second; first had failed: terminated;" in message and "\n" not in message
