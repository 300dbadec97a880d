"""The benchmark scripts still run (their quick modes); their numbers live in benchmarks/README.md."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["comm.py", "server_cost.py", "flexlora_svd.py"])
def test_benchmark_quick_mode_runs(script):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fslora" in proc.stdout or "factored" in proc.stdout
