"""The two reference lines every reader of a comparison asks for, on each task's own split,
budgets and held-out set (:data:`LINES` says what each one is)."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..atomic import write_atomic
from ..client import local_train
from ..config import RunConfig, to_toml
from ..encoding import train_batches
from ..experiment import build_experiment, clients_per_round, evaluate_task
from ..initial_eval import evaluate_initial
from ..outputs import headline, summary
from ..runner import SUMMARY, run, write_clients
from ..seeding import derive_seed, torch_generator
from ..simulate import simulate_round
from ..state import init_factors, lora_scale
from ..types import ClientTask

Reference = Literal["centralised", "local"]
LINES = {
    "centralised": "one LoRA at the global rank trained on the pooled training data of all clients, with the "
                   "federation's total number of optimiser steps (rounds x clients per round x local steps), as one "
                   "client in one round: what federation costs",
    "local": "every client trains alone on its own data at its own budget, for the steps it takes in the federation "
             "on average (rounds x its chance of being sampled x local steps); the held-out accuracies of the "
             "clients' models are averaged: what federation buys",
}


def centralised_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` as one client holding every training example, one round of all the federation's steps."""
    steps = cfg.federation.rounds * clients_per_round(cfg) * cfg.train.local_steps
    r = cfg.strategy.global_rank
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, num_clients=1, partition="iid"),
        strategy=dataclasses.replace(cfg.strategy, name="fullrank", settings={}),
        budgets=dataclasses.replace(cfg.budgets, ranks=[r], per_client=[], file=""),
        train=dataclasses.replace(cfg.train, local_steps=steps),
        federation=dataclasses.replace(cfg.federation, rounds=1, clients_per_round=1, fraction=1.0, eval_every=1))


def run_reference(kind: Reference, cfg: RunConfig, progress: bool = True) -> None:
    """Run a reference into ``cfg.output_dir`` unless it is finished there (an unfinished one restarts)."""
    out = Path(cfg.output_dir)
    if (out / SUMMARY).exists():
        return
    if kind == "centralised":
        run(centralised_config(cfg), simulate_round, overwrite=True, progress=progress)
    else:
        run_local_only(cfg, progress)


def run_local_only(cfg: RunConfig, progress: bool = True) -> dict:
    """Each client alone; writes the run files a study reads (config, clients, metrics, summary)."""
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    write_atomic(out / "config.toml", to_toml(cfg))
    exp = build_experiment(cfg)
    write_clients(exp, out)
    initial = evaluate_initial(exp, [])
    n = cfg.data.num_clients
    rounds_each = max(1, round(cfg.federation.rounds * clients_per_round(cfg) / n))
    steps = rounds_each * cfg.train.local_steps * cfg.train.grad_accum_steps
    head = exp.server.global_task().head
    results = []
    for cid in tqdm(range(n), desc="local", unit="client", disable=not progress):
        k = exp.budgets[cid]
        task = ClientTask(factors=init_factors(exp.lm.shapes(), k, torch.Generator().manual_seed(cfg.seed)),
                          scale=lora_scale(cfg.strategy.alpha, k, cfg.strategy.rslora), head=head)
        torch.manual_seed(derive_seed(cfg.seed, "local-dropout", cid))
        batches = train_batches(exp.data.encoded, exp.data.clients[cid], cfg.train.batch_size, steps,
                                torch_generator(cfg.seed, "local", cid))
        update = local_train(exp.lm, task, batches, cfg.train, len(exp.data.clients[cid]))
        results.append(evaluate_task(exp, ClientTask(factors=update.factors, scale=task.scale, head=update.head)))
    final = {k: statistics.fmean(r[k] for r in results) for k in results[0]}
    rows = [{"round": 0, **{f"eval_{k}": v for k, v in initial.items()}},
            {"round": 1, **{f"eval_{k}": v for k, v in final.items()}, "bytes_up": 0.0, "clients": float(n),
             f"client_{headline(results[0])}": [r[headline(r)] for r in results],  # accuracy, Rouge-L or loss
             "local_steps_per_client": steps}]
    write_atomic(out / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    result = summary(exp, initial, final, time.perf_counter() - start, out)
    write_atomic(out / SUMMARY, json.dumps(result, indent=1) + "\n")  # last: it marks the line finished
    return result
