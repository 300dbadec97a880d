"""Server aggregation cost against the number of clients, per strategy, in one run.

One 1024×1024 layer, budgets cycling {8, 16, 32} (global rank 64), updates = the tasks
plus noise. Prints the aggregation time at 10, 100 and 1000 clients and the time per
client (flat = linear in clients). FlexLoRA's dense-vs-factored comparison at LLaMA
shapes is benchmarks/flexlora_svd.py.

    python benchmarks/server_cost.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedlora.config import StrategyConfig
from fedlora.strategies import STRATEGIES, build_strategy
from fedlora.types import ClientSpec, ClientUpdate, Factors


def aggregate_seconds(name: str, shape: tuple[int, int], n: int) -> float:
    budgets = [(8, 16, 32)[i % 3] for i in range(n)]
    s = build_strategy(StrategyConfig(name=name, global_rank=64), {"layer": shape}, budgets, seed=0)
    tasks = s.configure(1, [ClientSpec(i, b, 100) for i, b in enumerate(budgets)])
    g = torch.Generator().manual_seed(0)
    ups = {c: ClientUpdate({k: Factors(f.A + 0.01 * torch.randn(f.A.shape, generator=g),
                                       f.B + 0.01 * torch.randn(f.B.shape, generator=g))
                            for k, f in t.factors.items()}, 100) for c, t in tasks.items()}
    t0 = time.perf_counter()
    s.aggregate(1, ups)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 256×256 layer, 10 and 100 clients")
    args = ap.parse_args()
    shape = (256, 256) if args.quick else (1024, 1024)
    counts = [10, 100] if args.quick else [10, 100, 1000]
    print(f"{'method':>9} | " + " | ".join(f"{n:>5} clients (ms/client)" for n in counts))
    for name in STRATEGIES:
        cells = []
        for n in counts:
            sec = aggregate_seconds(name, shape, n)
            cells.append(f"{sec * 1e3:9.1f} ms ({sec * 1e3 / n:5.2f})")
        print(f"{name:>9} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
