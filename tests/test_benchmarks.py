"""The benchmark scripts still run in their smoke mode (``--quick``) and report a summary.

Their numbers live in benchmarks/README.md; this only checks that the scripts work
against the current library (about 35 s in all on 2 cores).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name not in ("common.py", "run_all.py"))


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_quick_mode_runs_and_reports(script):
    # a guard against a hang, not a speed claim: flower_overhead's --quick starts four carriers
    # (SuperLinks, SuperNodes, Ray) and scale's trains 27 rounds, 150-250 s each on 2 busy cores, and over
    # 600 s when the 2 cores also carry a study's two workers
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick"], capture_output=True, text=True,
                          timeout=1200, cwd=BENCH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = [ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY ")]
    assert len(summary) == 1, proc.stdout[-2000:]
    rows = json.loads(summary[0][len("SUMMARY "):])
    assert rows and all({"metric", "value", "target", "met"} <= set(r) for r in rows)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_without_cuda_says_why_and_exits_0():
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py")], capture_output=True, text=True,
                          timeout=120, cwd=BENCH)
    assert proc.returncode == 0 and "nothing to measure here" in proc.stdout and "no CUDA" in proc.stdout
