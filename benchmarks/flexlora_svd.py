"""FlexLoRA server cost: dense SVD of ΔW vs the factored route, side by side in one run.

Each case runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own; the time
is the decomposition alone (inputs are built before the clock starts).

    python benchmarks/flexlora_svd.py            # LLaMA-7B shapes, R = 160 and 1280
    python benchmarks/flexlora_svd.py --quick    # small shapes, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import print_summary, summary_row

CHILD = r"""
import json, resource, sys, time, torch
from fedlora.lowrank import dense_svd, factored_svd
m, n, R, route = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
g = torch.Generator().manual_seed(0)
B, A = torch.randn(m, R, generator=g), torch.randn(R, n, generator=g)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
svd = (dense_svd if route == "dense" else factored_svd)(B, A)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "peak_mb": peak / 1024, "extra_mb": (peak - base) / 1024,
                  "top_sigma": float(svd.S[0])}))
"""


def run_case(m: int, n: int, R: int, route: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(m), str(n), str(R), route],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    args = ap.parse_args()
    cases = ([(512, 512, 16), (1024, 512, 64)] if args.quick else
             [(4096, 4096, 160), (4096, 4096, 1280), (11008, 4096, 160), (11008, 4096, 1280)])
    print(f"{'layer (m x n)':>14} {'R':>5} | {'dense s':>8} {'factored s':>10} {'speed-up':>8} | "
          f"{'dense +MB':>9} {'factored +MB':>12} {'memory':>7} | same σ₁")
    rows = []
    for m, n, R in cases:
        d, f = run_case(m, n, R, "dense"), run_case(m, n, R, "factored")
        if (m, n, R) == cases[0]:
            rows.append(summary_row("flexlora_svd", f"factored vs dense SVD alone, {m}x{n} R={R} (time; extra memory)",
                                    f"{d['seconds'] / f['seconds']:.0f}x; {d['extra_mb'] / max(f['extra_mb'], 1):.0f}x",
                                    ">= 50x" if not args.quick else "(quick)",
                                    d["seconds"] / f["seconds"] >= 50 if not args.quick else None))
        same = abs(d["top_sigma"] - f["top_sigma"]) <= 1e-3 * d["top_sigma"]
        print(f"{f'{m}x{n}':>14} {R:>5} | {d['seconds']:8.2f} {f['seconds']:10.3f} "
              f"{d['seconds'] / f['seconds']:7.0f}x | {d['extra_mb']:9.0f} {f['extra_mb']:12.0f} "
              f"{d['extra_mb'] / max(f['extra_mb'], 1):6.1f}x | {same}")
    print_summary(rows)


if __name__ == "__main__":
    main()
