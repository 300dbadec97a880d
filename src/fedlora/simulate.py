"""In-process simulator: every round's clients train one after another on one shared model.

The base model is loaded once; a client round only swaps the (small) LoRA factors and
head in and out, so nothing of size ``W0`` is copied per client.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .budgets import client_budgets
from .client import evaluate_classification, local_train
from .config import ConfigError, RunConfig, to_toml
from .data import (FederatedData, TextDataset, encode_classification, eval_batches, load_text_dataset,
                   split_clients, subsample, train_batches)
from .export import save_peft_adapter
from .lora import LoRAModel
from .models import load_model, resolve_model_path
from .seeding import derive_seed, torch_generator
from .server import FederatedServer, sample_clients
from .strategies import build_strategy
from .types import ClientUpdate


@dataclass
class Experiment:
    """Everything a run needs, built once from a config."""

    cfg: RunConfig
    lm: LoRAModel
    data: FederatedData
    budgets: list[int]
    server: FederatedServer

    @property
    def clients_per_round(self) -> int:
        fed, n = self.cfg.federation, self.cfg.data.num_clients
        return fed.clients_per_round or max(1, math.ceil(fed.fraction * n))


def build_data(cfg: RunConfig, ds: TextDataset, tokenizer) -> FederatedData:
    clients, test = split_clients(ds, cfg.data, cfg.seed)
    encoded = encode_classification(tokenizer, ds, cfg.model.max_length)
    return FederatedData(encoded=encoded, clients=clients, test=test, label_names=ds.label_names)


def build_experiment(cfg: RunConfig) -> Experiment:
    ds = subsample(load_text_dataset(cfg.data), cfg.data.max_examples, cfg.seed)
    loaded = load_model(cfg.model, num_labels=len(ds.label_names), seed=cfg.seed)
    data = build_data(cfg, ds, loaded.tokenizer)
    lm = LoRAModel(loaded.model, cfg.model.targets, head=loaded.head, dropout=cfg.model.dropout)
    budgets = client_budgets(cfg.budgets, cfg.data.num_clients, cfg.seed)
    strategy = build_strategy(cfg.strategy, lm.shapes(), budgets, cfg.seed)
    server = FederatedServer(strategy, lm.head_state(), budgets, [len(c) for c in data.clients])
    return Experiment(cfg, lm, data, budgets, server)


def train_client(exp: Experiment, rnd: int, cid: int, task) -> ClientUpdate:
    """One client's local round; its randomness depends only on (seed, round, client)."""
    cfg = exp.cfg
    torch.manual_seed(derive_seed(cfg.seed, "dropout", rnd, cid))
    batches = train_batches(exp.data.encoded, exp.data.clients[cid], cfg.train.batch_size,
                            cfg.train.local_steps, torch_generator(cfg.seed, "batches", rnd, cid))
    return local_train(exp.lm, task, batches, cfg.train, len(exp.data.clients[cid]))


def evaluate_global(exp: Experiment) -> dict[str, float]:
    batches = eval_batches(exp.data.encoded, exp.data.test, exp.cfg.federation.eval_batch_size)
    return evaluate_classification(exp.lm, exp.server.global_task(), batches)


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    if (out / "metrics.jsonl").exists() and not overwrite:
        raise ConfigError(
            f"output directory {out} already holds a run; pass --overwrite or set output_dir=..."
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)


def run(cfg: RunConfig, overwrite: bool = False, progress: bool = True,
        exp: Experiment | None = None) -> dict[str, float]:
    """Run every round, writing ``config.toml``, ``clients.json``, ``metrics.jsonl`` and
    ``adapter/`` into the output directory; return a summary."""
    out = cfg.resolved_output_dir()
    prepare_output_dir(out, overwrite)
    (out / "config.toml").write_text(to_toml(cfg))
    start = time.perf_counter()
    exp = exp or build_experiment(cfg)
    (out / "clients.json").write_text(json.dumps(
        {"budgets": exp.budgets, "num_examples": [len(c) for c in exp.data.clients],
         "test_examples": len(exp.data.test), "labels": exp.data.label_names}, indent=1))
    fed = cfg.federation
    initial = evaluate_global(exp)
    _append(out, {"round": 0, **{f"eval_{k}": v for k, v in initial.items()},
                  "wall_time_s": time.perf_counter() - start})
    last_eval = initial
    bar = tqdm(range(1, fed.rounds + 1), desc=f"{cfg.strategy.name}", unit="round",
               disable=not progress, dynamic_ncols=True)
    for rnd in bar:
        t0 = time.perf_counter()
        cids = sample_clients(cfg.data.num_clients, exp.clients_per_round, cfg.seed, rnd)
        tasks = exp.server.configure(rnd, cids)
        updates = {cid: train_client(exp, rnd, cid, task) for cid, task in tasks.items()}
        metrics = exp.server.aggregate(rnd, tasks, updates)
        if rnd % fed.eval_every == 0 or rnd == fed.rounds:
            last_eval = evaluate_global(exp)
            metrics.update({f"eval_{k}": v for k, v in last_eval.items()})
        metrics["wall_time_s"] = time.perf_counter() - t0
        _append(out, {"round": rnd, **metrics})
        bar.set_postfix(loss=f"{metrics.get('train_loss', float('nan')):.3f}",
                        acc=f"{last_eval['accuracy']:.3f}")
    save_peft_adapter(exp.server.global_task(), out / "adapter",
                      resolve_model_path(cfg.model), cfg.strategy.alpha)
    majority = float(np.bincount(exp.data.encoded.labels[exp.data.test].numpy()).max()
                     / len(exp.data.test))
    summary = {"initial_accuracy": initial["accuracy"], "final_accuracy": last_eval["accuracy"],
               "final_loss": last_eval["loss"], "majority_accuracy": majority,
               "wall_time_s": time.perf_counter() - start, "output_dir": str(out)}
    # Written last: its presence marks a finished run (compare skips those on resume).
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _append(out: Path, record: dict) -> None:
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
