"""Server aggregation cost against clients per round and layer shape, per strategy, in one run.

Every registered strategy (``fedlora.strategies.METHODS``) aggregates synthetic
updates built from its own tasks (the task's factors plus seeded noise), over one
module. Budgets cycle {8, 16, 32}, global rank 64. Only ``Strategy.aggregate`` is timed
(median of a few repetitions, each on a fresh strategy); tasks and updates are built
before the clock starts.

1. Clients per round 10 / 100 / 1000 on a 1024×1024 layer, with the time per client
   and its growth from 10 and from 100 to 1000 clients (≈ 1 or below: linear in
   clients; the target is judged from 100, where times are well above timer noise), and the
   peak of torch allocations during the 1000-client aggregation (torch.profiler) next
   to the size of the updates it reads.
2. Layer shapes up to 11008×4096 at 10 clients.
3. FlexLoRA's aggregation with the factored SVD (the library's route) against the
   dense SVD of ΔW (the published route), at 4096×4096 and 11008×4096 with 10
   clients at rank 16 (stacked rank R = 160).

    python benchmarks/server_cost.py            # the numbers in benchmarks/README.md
    python benchmarks/server_cost.py --quick    # smoke test: small layers, 10 and 100 clients
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch
from common import print_summary, summary_row, torch_peak_mb

from fedlora.strategies import METHODS, build_strategy
from fedlora.types import ClientSpec, ClientUpdate, Factors

LINEAR = ("fslora", "hetlora", "fedit")  # the strategies the issue asks to be linear in clients


def build_round(name: str, shape: tuple[int, int], budgets: Sequence[int]):
    """A fresh strategy that has configured one round, and the round's synthetic updates."""
    s = build_strategy(name, {"layer": shape}, budgets, seed=0, global_rank=64, alpha=16.0)
    tasks = s.configure(1, [ClientSpec(i, b, 100 + i) for i, b in enumerate(budgets)])
    g = torch.Generator().manual_seed(0)
    ups = {c: ClientUpdate({k: Factors(f.A + 0.01 * torch.randn(f.A.shape, generator=g),
                                       f.B + 0.01 * torch.randn(f.B.shape, generator=g))
                            for k, f in t.factors.items()}, 100 + c, freeze_A=t.freeze_A)
           for c, t in tasks.items()}
    return s, ups


def aggregate_seconds(name: str, shape: tuple[int, int], budgets: Sequence[int], reps: int) -> float:
    times = []
    for _ in range(reps):
        s, ups = build_round(name, shape, budgets)
        t0 = time.perf_counter()
        s.aggregate(1, ups)
        times.append(time.perf_counter() - t0)
        del s, ups
    return statistics.median(times)


def aggregate_peak_mb(name: str, shape: tuple[int, int], budgets: Sequence[int]) -> tuple[float, float]:
    """(peak torch memory allocated during aggregate, size of the round's updates), in MB."""
    s, ups = build_round(name, shape, budgets)
    held = sum(f.A.nbytes + f.B.nbytes for u in ups.values() for f in u.factors.values()) / 2**20
    return torch_peak_mb(lambda: s.aggregate(1, ups)), held


def cycling(n: int) -> list[int]:
    return [(8, 16, 32)[i % 3] for i in range(n)]


def flexlora_routes(shape: tuple[int, int], clients: int, rank: int, reps: int) -> tuple[float, float]:
    """FlexLoRA's aggregate with the factored SVD and with the dense one (seconds)."""
    from fedlora import lowrank
    from fedlora.strategies import flexlora

    factored = aggregate_seconds("flexlora", shape, [rank] * clients, reps)
    route = flexlora.svd_of_product
    flexlora.svd_of_product = lowrank.dense_svd  # the published route: form ΔW, full SVD
    try:
        dense = aggregate_seconds("flexlora", shape, [rank] * clients, 1)
    finally:
        flexlora.svd_of_product = route
    return dense, factored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: small layers, 10 and 100 clients")
    args = ap.parse_args()
    torch.set_num_threads(2)
    names = list(METHODS)
    rows = []

    shape = (256, 256) if args.quick else (1024, 1024)
    counts = [10, 100] if args.quick else [10, 100, 1000]
    print(f"1. aggregation time vs clients per round: one {shape[0]}x{shape[1]} layer, budgets cycling "
          f"{{8, 16, 32}}, median of 3")
    print(f"{'method':>9} | " + " | ".join(f"{n:>5} clients: ms (ms/client)" for n in counts)
          + f" | per-client growth {counts[0]}->{counts[-1]}, {counts[-2]}->{counts[-1]} | "
          f"peak MB at {counts[-1]} (updates MB)")
    growth, growth_all = {}, {}
    for name in names:
        sec = [aggregate_seconds(name, shape, cycling(n), 3) for n in counts]
        growth_all[name] = (sec[-1] / counts[-1]) / (sec[0] / counts[0])
        growth[name] = (sec[-1] / counts[-1]) / (sec[-2] / counts[-2])
        peak, held = aggregate_peak_mb(name, shape, cycling(counts[-1]))
        print(f"{name:>9} | " + " | ".join(f"{s * 1e3:10.1f} ({s * 1e3 / n:6.3f})     " for s, n in zip(sec, counts))
              + f" | {growth_all[name]:22.2f}x {growth[name]:6.2f}x | {peak:8.1f} ({held:.1f})")

    shapes = [(256, 256), (512, 1024)] if args.quick else [(1024, 1024), (4096, 4096), (11008, 4096)]
    print("\n2. aggregation time vs layer shape: 10 clients, budgets cycling {8, 16, 32}, median of 3")
    print(f"{'method':>9} | " + " | ".join(f"{m}x{n:<5} ms" for m, n in shapes))
    for name in names:
        print(f"{name:>9} | " + " | ".join(f"{aggregate_seconds(name, sh, cycling(10), 3) * 1e3:12.1f}"
                                            for sh in shapes))

    cases = [(512, 512)] if args.quick else [(4096, 4096), (11008, 4096)]
    print("\n3. FlexLoRA aggregation, 10 clients at rank 16 (R = 160): dense SVD of ΔW vs factored")
    print(f"{'layer':>12} | {'dense s':>8} {'factored s':>10} {'speed-up':>8}")
    speedups = {}
    for sh in cases:
        dense, factored = flexlora_routes(sh, 10, 16, 3)
        speedups[sh] = dense / factored
        print(f"{f'{sh[0]}x{sh[1]}':>12} | {dense:8.2f} {factored:10.3f} {speedups[sh]:7.0f}x")

    for name in LINEAR:  # judged from 100 to 1000 clients: at 10 a round takes microseconds
        rows.append(summary_row("server_cost", f"{name}: aggregation time per client, {counts[-2]} -> {counts[-1]} "
                                f"clients ({counts[0]} -> {counts[-1]}: {growth_all[name]:.2f}x)",
                                f"{growth[name]:.2f}x", "<= 1.5x (linear)", growth[name] <= 1.5))
    key = cases[0]
    rows.append(summary_row("server_cost", f"FlexLoRA factored vs dense, {key[0]}x{key[1]} R=160",
                            f"{speedups[key]:.0f}x", ">= 50x", speedups[key] >= 50 if not args.quick else None))
    print_summary(rows)


if __name__ == "__main__":
    main()
