"""The command line: bad input gets one clear line and exit code 2, never a traceback; --help explains."""

import subprocess
import sys

import pytest

from fedlora.cli import main

from .conftest import tiny_overrides


@pytest.mark.parametrize("extra, message", [
    (["strategy.bogus=1"], "unknown config key 'strategy.bogus'"),
    (["budgets.ranks=[4, 16]"], "exceed the global rank"),
    (["budgets.ranks=[0, 4]"], "budgets.ranks: ranks must be positive"),
    (["strategy.global_rank=-1"], "strategy.global_rank"),
    (["model.name=/nonexistent/model"], "model directory not found"),
    (["data.max_examples=70", "data.num_clients=20", "data.partition=\"iid\""], "cannot fill"),
    (["data.name=/nonexistent.csv"], "file not found"),
])
def test_user_mistakes_exit_2_with_one_line(tiny_bert_dir, tmp_path, capsys, extra, message):
    code = main(["run", *tiny_overrides(tiny_bert_dir, tmp_path / "out"), *extra, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("fedlora: error:")


def test_missing_config_file_exit_2_from_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedlora.cli", "run", str(tmp_path / "nope.toml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_refuses_to_overwrite_a_finished_run(tiny_bert_dir, tmp_path, capsys):
    args = ["run", *tiny_overrides(tiny_bert_dir, tmp_path / "out"), "federation.rounds=1", "--quiet"]
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_help_explains_itself(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    assert "key=value" in capsys.readouterr().out
