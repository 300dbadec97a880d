"""Client cost against its budget: one local step of FSLoRA at budget k of a rank-64
adapter, next to a plain rank-k LoRA and the full rank 64, side by side in one run.

Time: median of interleaved repetitions (the cases alternate, so machine drift hits
all alike). Memory: peak RSS of a fresh process that loads the model and takes one
step in that mode (ru_maxrss sees torch's CPU allocations; the base model is the
same in every case, so the differences are the LoRA state, gradients, optimizer
state and activations).

    python benchmarks/client_cost.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[4])
from client_cost import setup, step
mode, k, quick = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
ctx = setup(quick)
step(ctx, mode, k)
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def setup(quick: bool) -> dict:
    import torch

    from fedlora.config import ModelConfig, TrainConfig
    from fedlora.lora import LoRAModel
    from fedlora.models import load_model

    torch.manual_seed(0)
    loaded = load_model(ModelConfig(), num_labels=3, seed=0)
    lm = LoRAModel(loaded.model, ["query", "value"], head=loaded.head)
    batch_size, length = (4, 32) if quick else (16, 64)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (batch_size, length), generator=g),
             "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
             "labels": torch.randint(0, 3, (batch_size,), generator=g)}
    return {"lm": lm, "batch": batch, "train": TrainConfig(local_steps=1, lr=1e-3)}


def task_for(ctx: dict, mode: str, k: int):
    import torch

    from fedlora import state as S
    from fedlora.strategies.fslora import FSLoRA
    from fedlora.types import ClientSpec, ClientTask

    shapes = ctx["lm"].shapes()
    if mode == "fslora":  # a sketched sub-block of a rank-64 global adapter
        return FSLoRA(shapes, 64, 16.0, seed=0).configure(1, [ClientSpec(0, k, 10)])[0]
    rank = 64 if mode == "full" else k
    return ClientTask(factors=S.init_factors(shapes, rank, torch.Generator().manual_seed(0)),
                      scale=16.0 / rank)


def step(ctx: dict, mode: str, k: int) -> float:
    """Build the task and take one local step; return the seconds it took."""
    from fedlora.client import local_train

    t0 = time.perf_counter()
    task = task_for(ctx, mode, k)
    task.head = ctx["lm"].head_state()
    local_train(ctx["lm"], task, [ctx["batch"]], ctx["train"], 10)
    return time.perf_counter() - t0


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small batch, 2 budgets, 2 repetitions")
    args = ap.parse_args()
    torch.set_num_threads(2)
    budgets = [8, 32] if args.quick else [4, 8, 16, 32, 64]
    reps = 2 if args.quick else 7
    ctx = setup(args.quick)
    for mode in ("fslora", "plain"):
        step(ctx, mode, budgets[0])  # warm-up
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(reps):
        for k in budgets:
            for mode in ("fslora", "plain", "full"):
                times.setdefault((mode, k), []).append(step(ctx, mode, k))
    here = str(__import__("pathlib").Path(__file__).resolve().parent)

    def peak(mode: str, k: int) -> float:
        out = subprocess.run([sys.executable, "-c", CHILD, mode, str(k), "1" if args.quick else "0", here],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]

    print(f"{'k':>3} | {'FSLoRA ms':>9} {'rank-k ms':>9} {'rank-64 ms':>10} {'FSLoRA/rank-k':>13} | "
          f"{'FSLoRA MB':>9} {'rank-k MB':>9} {'rank-64 MB':>10} {'ratio':>6}")
    for k in budgets:
        med = {m: statistics.median(times[(m, k)]) * 1e3 for m in ("fslora", "plain", "full")}
        mem = {m: peak(m, k) for m in ("fslora", "plain", "full")}
        print(f"{k:>3} | {med['fslora']:9.0f} {med['plain']:9.0f} {med['full']:10.0f} "
              f"{med['fslora'] / med['plain']:12.2f}x | {mem['fslora']:9.0f} {mem['plain']:9.0f} "
              f"{mem['full']:10.0f} {mem['fslora'] / mem['plain']:5.2f}x")


if __name__ == "__main__":
    main()
