"""Run every benchmark, show their tables, and end with one summary table of the targets.

    python benchmarks/run_all.py           # the numbers in benchmarks/README.md (~15 min on 2 cores)
    python benchmarks/run_all.py --quick   # smoke mode of every script (~85 s)

Each script runs in its own process (so one's memory does not colour another's) and
ends with a ``SUMMARY [...]`` line that is gathered here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = ["comm.py", "server_cost.py", "flexlora_svd.py", "client_cost.py", "sim_overhead.py", "scale.py",
           "study_jobs.py", "mc_eval.py", "rank_recovery.py"]
NOISE = ("USDT:", "CPUAllocator.cpp", "Writing model shards")  # profiler/kineto chatter on stderr


def run(script: Path, args: list[str]) -> tuple[int, list[dict]]:
    """Run one script, echo its output (minus library chatter), return its summary rows."""
    rows: list[dict] = []
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=script.parent)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("SUMMARY "):
            rows.extend(json.loads(line[len("SUMMARY "):]))
        elif not any(n in line for n in NOISE):
            print(line, end="", flush=True)
    return proc.wait(), rows


def main() -> int:
    quick = "--quick" in sys.argv
    here = Path(__file__).resolve().parent
    results, failed = [], []
    start = time.perf_counter()
    for name in SCRIPTS:
        print(f"\n=== {name}{' --quick' if quick else ''} ===", flush=True)
        t0 = time.perf_counter()
        code, rows = run(here / name, ["--quick"] if quick else [])
        if quick:  # smoke sizes: the numbers say the script works, not whether a target is met
            rows = [dict(r, met=None) for r in rows]
        results.append((name, code, time.perf_counter() - t0, rows))
        if code:
            failed.append(name)
    print(f"\n=== summary ({'quick smoke mode: sizes too small for the targets' if quick else 'full'}; "
          f"{time.perf_counter() - start:.0f} s in all) ===")
    print(f"{'script':<17} {'s':>5} | {'measured':<28} {'target':<17} {'met':<4} | metric")
    for name, code, sec, rows in results:
        if code:
            print(f"{name:<17} {sec:5.0f} | FAILED (exit {code})")
        for r in rows:
            met = {True: "yes", False: "NO", None: "-"}[r["met"]]
            print(f"{name:<17} {sec:5.0f} | {r['value']:<28} {r['target']:<17} {met:<4} | {r['metric']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
