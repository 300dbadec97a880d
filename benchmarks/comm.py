"""Bytes per client per round for every method at LLaMA-7B shapes, from real tensors.

One transformer layer of LLaMA-7B (q, k, v, o: 4096×4096; gate, up: 11008×4096;
down: 4096×11008) is built for real; the per-layer bytes are multiplied by the 32
layers (building all 32 would only repeat the same tensors). Budgets: 4 clients at
ranks {8, 16, 32, 64}, global rank 64, fp32 factors.

    python benchmarks/comm.py [--quick]
"""

from __future__ import annotations

import argparse

import torch
from common import print_summary, summary_row

from fedlora.strategies import METHODS, build_strategy
from fedlora.types import ClientSpec, ClientUpdate, Factors, payload_nbytes

LAYER = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
         "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 512-wide layer instead of LLaMA-7B's")
    args = ap.parse_args()
    shapes = {k: (o // 8, i // 8) for k, (o, i) in LAYER.items()} if args.quick else LAYER
    layers = 32
    budgets = [8, 16, 32, 64]
    specs = [ClientSpec(cid=i, budget=b, num_examples=100) for i, b in enumerate(budgets)]
    dense_mb = sum(m * n for m, n in shapes.values()) * 4 * layers / 1e6  # every delta sent dense
    print(f"{'One LLaMA-7B layer x 32' if not args.quick else 'A LLaMA-7B layer / 8, x 32'}, fp32, 4 clients at "
          f"ranks {budgets}, global rank 64; MB (1e6 B) per client in round 3, down / up, as the Flower codec "
          f"encodes them (a base delta dense once (m + n) r > m n). The dense size of every adapted matrix: "
          f"{dense_mb:.0f} MB.\n")
    print("| method | " + " | ".join(f"r = {b}: down / up" for b in budgets) + " | note |")
    print("|---" * (len(budgets) + 2) + "|")
    table = {}
    for name in METHODS:
        s = build_strategy(name, shapes, budgets, seed=0, global_rank=64, alpha=16.0)
        downs = []
        for rnd in (1, 2, 3):  # rounds 2 and 3 show what accumulates (merged deltas)
            tasks = s.configure(rnd, specs)
            # the clients move B a little (seeded): an echo would merge nothing into FLoRIST's delta
            g = torch.Generator().manual_seed(rnd)
            ups = {c: ClientUpdate(factors={n: Factors(A=f.A, B=f.B + 0.01 * torch.randn(f.B.shape, generator=g))
                                            for n, f in t.factors.items()}, num_examples=100, freeze_A=t.freeze_A)
                   for c, t in tasks.items()}
            downs.append(sum(payload_nbytes(t) for t in tasks.values()))
            if rnd == 3:
                cells = [(payload_nbytes(tasks[c]) * layers / 1e6, payload_nbytes(ups[c]) * layers / 1e6)
                         for c in range(len(budgets))]
            s.aggregate(rnd, ups)
        note = "ignores budgets" if name == "fullrank" else ""
        if downs[2] > downs[1]:  # a delta that grows every round, up to its dense size
            note = (f"down grows by {(downs[2] - downs[1]) * layers / 4e6:.0f} MB a round, at most the pair + "
                    f"{dense_mb:.0f} MB (dense)")
        table[name] = cells
        print(f"| {name} | " + " | ".join(f"{d:.1f} / {u:.1f}" for d, u in cells) + f" | {note} |")
    fs, full = table["fslora"], table.get("fullrank", table["fslora"])
    shapes_name = "LLaMA-7B shapes / 8" if args.quick else "LLaMA-7B shapes"
    print_summary([summary_row("comm", f"FSLoRA upload at k=8 / full rank 64 ({shapes_name})",
                               f"{fs[0][1]:.1f} / {full[0][1]:.1f} MB = {fs[0][1] / full[0][1]:.3f}x",
                               "k/r = 0.125x", abs(fs[0][1] / full[0][1] - 8 / 64) < 1e-3)])

if __name__ == "__main__":
    main()
