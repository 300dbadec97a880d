"""Run the quick version of every benchmark and print their tables (a few minutes).

    python benchmarks/run_all.py          # quick versions
    python benchmarks/run_all.py --full   # the full versions (tens of minutes)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = ["flexlora_svd.py", "server_cost.py", "comm.py", "client_cost.py", "sim_overhead.py", "scale.py"]


def main() -> int:
    full = "--full" in sys.argv
    here = Path(__file__).resolve().parent
    failed = []
    summary = []
    for name in SCRIPTS:
        t0 = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        proc = subprocess.run([sys.executable, str(here / name), *([] if full else ["--quick"])])
        summary.append((name, proc.returncode, time.perf_counter() - t0))
        if proc.returncode:
            failed.append(name)
    print("\n=== summary ===")
    for name, code, sec in summary:
        print(f"{name:<18} {'ok' if code == 0 else f'FAILED ({code})':<12} {sec:6.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
