"""Client cost against its budget: one local step of an FSLoRA client at budget k of a
rank-64 adapter, next to a plain rank-k LoRA and the full rank 64, side by side in one run.

The model is MiniLM-L6 (builtin) with LoRA on query/value and the classifier head; one
batch of 16 × 64 tokens. A case is one ``local_train`` call with one step: load the
task into the model, build the optimiser, forward, backward, clip, step, return the
update. The FSLoRA task comes from ``FSLoRA.configure`` (built before the clock starts:
that is server work); the plain tasks are fresh rank-k pairs.

Time: median over repetitions in which every case runs once, in a shuffled order
(drift on a shared machine then hits every case alike).

Memory: the peak of live torch CPU allocations during the call, replayed from
``torch.profiler``'s allocation events (profile_memory=True), each case starting from
the same resting state (the previous case's pairs and gradients dropped). This sees exactly what
the client allocates for the step (LoRA copies, activations kept for backward,
gradients, AdamW state) and nothing of the model already resident, so differences of
a few MB are visible; process RSS is dominated by the ~100 MB model and the Python
runtime, and its peak since start is set by model loading, not by the step. As a
cross-check the full run also measures each case in a fresh process: peak RSS during
a second step (after a warm-up step, with the peak mark reset) minus RSS before it,
with glibc's mmap threshold pinned so freed buffers go back to the OS.

    python benchmarks/client_cost.py            # k in {4, 8, 16, 32, 64}, 7 repetitions
    python benchmarks/client_cost.py --quick    # smoke test: 4 × 32 batch, k in {8, 32}
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import print_summary, summary_row, torch_peak_mb

GLOBAL_RANK = 64
ALPHA = 16.0


def setup(quick: bool) -> dict:
    from transformers.utils import logging as hf_logging

    from fedlora.config import ModelConfig, TrainConfig
    from fedlora.lora import LoRAModel
    from fedlora.models import load_model

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    loaded = load_model(ModelConfig(name="builtin:minilm"), num_labels=3, seed=0)
    lm = LoRAModel(loaded.model, ["query", "value"], head=loaded.head)
    batch_size, length = (4, 32) if quick else (16, 64)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (batch_size, length), generator=g),
             "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
             "labels": torch.randint(0, 3, (batch_size,), generator=g)}
    return {"lm": lm, "batch": batch, "train": TrainConfig(local_steps=1, lr=1e-3)}


def make_task(ctx: dict, mode: str, k: int):
    """``fslora``: the sketched rank-k block of a rank-64 global pair; ``plain``: rank-k LoRA."""
    from fedlora import state as S
    from fedlora.strategies.fslora import FSLoRA
    from fedlora.types import ClientSpec, ClientTask

    shapes = ctx["lm"].shapes()
    if mode == "fslora":
        task = FSLoRA(shapes, GLOBAL_RANK, ALPHA, seed=0).configure(1, [ClientSpec(0, k, 10)])[0]
    else:
        task = ClientTask(factors=S.init_factors(shapes, k, torch.Generator().manual_seed(0)),
                          scale=S.lora_scale(ALPHA, k))
    task.head = ctx["lm"].head_state()
    return task


def step(ctx: dict, task) -> None:
    from fedlora.client import local_train

    local_train(ctx["lm"], task, [ctx["batch"]], ctx["train"], 10)


def clear(ctx: dict) -> None:
    """Drop the previous case's LoRA pairs and gradients, so a step starts from the same
    resting state whatever ran before it (and frees nothing the profiler did not see)."""
    from fedlora.types import Factors

    for layer in ctx["lm"].layers.values():
        out_f, in_f = layer.shape
        layer.set_factors(Factors(A=torch.zeros(0, in_f), B=torch.zeros(out_f, 0)), 0.0)
    for p in ctx["lm"].model.parameters():
        p.grad = None
    gc.collect()


def memory_mb(ctx: dict, task) -> float:
    clear(ctx)
    return torch_peak_mb(lambda: step(ctx, task))


def timed(ctx: dict, task) -> float:
    t0 = time.perf_counter()
    step(ctx, task)
    return time.perf_counter() - t0


CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[3])
import torch
torch.set_num_threads(2)
from client_cost import clear, make_task, setup, step
from common import peak_rss_mb, reset_peak_rss, rss_mb
ctx = setup(False)
task = make_task(ctx, sys.argv[1], int(sys.argv[2]))
step(ctx, task)  # warm-up: lazy initialisation of kernels and caches
clear(ctx)
before = rss_mb()
ok = reset_peak_rss()
step(ctx, task)
print(json.dumps({"extra_mb": peak_rss_mb() - before if ok else float("nan")}))
"""


def fresh_process_peak(mode: str, k: int) -> float:
    """Peak RSS above the resting RSS during one step, in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed buffers leave the process
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(k), str(Path(__file__).resolve().parent)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: small batch, 2 budgets, 2 repetitions")
    ap.add_argument("--reps", type=int, default=0, help="timing repetitions (default 7; quick 2)")
    ap.add_argument("--no-rss", action="store_true", help="skip the fresh-process RSS cross-check")
    args = ap.parse_args()
    torch.set_num_threads(2)
    budgets = [8, 32] if args.quick else [4, 8, 16, 32, 64]
    reps = args.reps or (2 if args.quick else 7)
    ctx = setup(args.quick)
    cases = [(m, k) for k in budgets for m in ("fslora", "plain")]
    if GLOBAL_RANK not in budgets:
        cases.append(("plain", GLOBAL_RANK))
    tasks = {c: make_task(ctx, *c) for c in cases}
    for c in cases:  # warm-up
        step(ctx, tasks[c])
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
    rng = random.Random(0)
    t_start = time.perf_counter()
    for _ in range(reps):
        order = cases[:]
        rng.shuffle(order)
        for c in order:
            times[c].append(timed(ctx, tasks[c]))
    mem = {c: memory_mb(ctx, tasks[c]) for c in cases}
    rss = {}
    if not args.quick and not args.no_rss:
        rss = {c: fresh_process_peak(*c) for c in cases}
    ms = {c: statistics.median(v) * 1e3 for c, v in times.items()}
    full = ("plain", GLOBAL_RANK)
    lora_params = {k: sum(k * (o + i) for o, i in ctx["lm"].shapes().values()) for k in budgets}

    b = ctx["batch"]["input_ids"].shape
    print(f"MiniLM-L6, LoRA query/value + head, batch {b[0]}x{b[1]}, global rank {GLOBAL_RANK}; "
          f"median of {reps} interleaved repetitions ({time.perf_counter() - t_start:.0f} s)")
    head = (f"{'k':>3} {'LoRA params':>11} | {'FSLoRA ms':>9} {'rank-k ms':>9} {'rank-64 ms':>10} "
            f"{'FS/rank-k':>9} | {'FSLoRA MB':>9} {'rank-k MB':>9} {'rank-64 MB':>10} {'FS/rank-k':>9}")
    if rss:
        head += f" | {'RSS FS MB':>9} {'RSS k MB':>8} {'RSS 64 MB':>9}"
    print(head)
    t_ratios, m_ratios = [], []
    for k in budgets:
        fs, pl = ("fslora", k), ("plain", k)
        t_ratios.append(ms[fs] / ms[pl])
        m_ratios.append(mem[fs] / mem[pl])
        line = (f"{k:>3} {lora_params[k]:>11,} | {ms[fs]:9.1f} {ms[pl]:9.1f} {ms[full]:10.1f} "
                f"{t_ratios[-1]:8.2f}x | {mem[fs]:9.1f} {mem[pl]:9.1f} {mem[full]:10.1f} {m_ratios[-1]:8.3f}x")
        if rss:
            line += f" | {rss[fs]:9.1f} {rss[pl]:8.1f} {rss[full]:9.1f}"
        print(line)
    spread = {c: (min(v) * 1e3, max(v) * 1e3) for c, v in times.items()}
    print("time spread (min-max ms): " + ", ".join(f"{m}@{k} {lo:.0f}-{hi:.0f}" for (m, k), (lo, hi) in spread.items()))
    print_summary([
        summary_row("client_cost", "FSLoRA@k / rank-k LoRA, time (worst k)", f"{max(t_ratios):.2f}x", "<= 1.10x",
                    max(t_ratios) <= 1.10),
        summary_row("client_cost", "FSLoRA@k / rank-k LoRA, torch peak memory (worst k)", f"{max(m_ratios):.3f}x",
                    "<= 1.10x", max(m_ratios) <= 1.10),
    ])


if __name__ == "__main__":
    main()
