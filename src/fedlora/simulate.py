"""In-process simulator: every round's clients train one after another on one shared model.

The base model is loaded once; a client round only swaps the (small) LoRA factors and
head in and out, so nothing of size ``W0`` is copied per client.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .budgets import client_budgets
from .causal import choice_logprobs, choice_metrics, encode_choices, encode_pairs
from .checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from .client import evaluate_classification, local_train
from .config import ConfigError, RunConfig, to_toml
from .data import (
    FederatedData,
    TextDataset,
    encode_classification,
    eval_batches,
    load_text_dataset,
    split_clients,
    split_fingerprint,
    subsample,
    train_batches,
)
from .export import save_peft_adapter
from .lora import LoRAModel
from .models import load_model, resolve_model_path
from .seeding import derive_seed, numpy_rng, torch_generator
from .server import FederatedServer, sample_clients
from .strategies import build_strategy
from .types import ClientUpdate

log = logging.getLogger("fedlora.simulate")


@dataclass
class Experiment:
    """Everything a run needs, built once from a config."""

    cfg: RunConfig
    lm: LoRAModel
    data: FederatedData
    budgets: list[int]
    server: FederatedServer



def clients_per_round(cfg: RunConfig) -> int:
    fed, n = cfg.federation, cfg.data.num_clients
    return fed.clients_per_round or max(1, math.ceil(fed.fraction * n))


def build_data(cfg: RunConfig, ds: TextDataset, tokenizer) -> FederatedData:
    clients, test = split_clients(ds, cfg.data, cfg.seed)
    if cfg.model.task == "classification":
        encoded = encode_classification(tokenizer, ds, cfg.model.max_length)
        return FederatedData(encoded=encoded, clients=clients, test=test, label_names=ds.label_names)
    # causal-lm: "prompt -> label name" pairs; questions scored over the label set
    names = ds.label_names
    try:
        prompts = [cfg.data.prompt_template.format(text=t, labels=", ".join(names)) for t in ds.texts]
    except (KeyError, IndexError) as e:
        raise ConfigError(f"data.prompt_template: unknown field {e}; use {{text}} and {{labels}}") from None
    encoded = encode_pairs(tokenizer, prompts, [names[y] for y in ds.labels], cfg.model.max_length)
    questions = encode_choices(tokenizer, [prompts[i] for i in test], names, ds.labels[test].tolist(),
                               cfg.model.max_length)
    return FederatedData(encoded=encoded, clients=clients, test=test, label_names=names, questions=questions)


def build_experiment(cfg: RunConfig) -> Experiment:
    ds = subsample(load_text_dataset(cfg.data), cfg.data.max_examples, cfg.seed)
    loaded = load_model(cfg.model, num_labels=len(ds.label_names), seed=cfg.seed)
    data = build_data(cfg, ds, loaded.tokenizer)
    lm = LoRAModel(loaded.model, cfg.model.targets, head=loaded.head, dropout=cfg.model.dropout)
    budgets = client_budgets(cfg.budgets, cfg.data.num_clients, cfg.seed)
    strategy = build_strategy(cfg.strategy, lm.shapes(), budgets, cfg.seed)
    try:
        server = FederatedServer(
            strategy, lm.head_state(), budgets, [len(c) for c in data.clients],
            fingerprint=lm.fingerprint, min_clients=cfg.reliability.min_clients,
            privacy=cfg.privacy, seed=cfg.seed,
            sample_rate=clients_per_round(cfg) / cfg.data.num_clients,
            weighting=cfg.strategy.weighting)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Experiment(cfg, lm, data, budgets, server)


def train_client(exp: Experiment, rnd: int, cid: int, task) -> ClientUpdate:
    """One client's local round; its randomness depends only on (seed, round, client)."""
    cfg = exp.cfg
    torch.manual_seed(derive_seed(cfg.seed, "dropout", rnd, cid))
    batches = train_batches(exp.data.encoded, exp.data.clients[cid], cfg.train.batch_size,
                            cfg.train.local_steps, torch_generator(cfg.seed, "batches", rnd, cid))
    return local_train(exp.lm, task, batches, cfg.train, len(exp.data.clients[cid]))


def evaluate_global(exp: Experiment) -> dict[str, float]:
    """Accuracy and loss of the global model on the held-out set (for a causal LM: accuracy
    of picking the right label by log-likelihood, and the answer-token loss)."""
    if exp.data.questions is None:
        batches = eval_batches(exp.data.encoded, exp.data.test, exp.cfg.federation.eval_batch_size)
        return evaluate_classification(exp.lm, exp.server.global_task(), batches)
    exp.lm.load(exp.server.global_task())
    exp.lm.model.eval()
    scores = choice_logprobs(exp.lm.model, exp.data.questions, exp.cfg.federation.eval_batch_size)
    return choice_metrics(scores, exp.data.questions)


class ClientFault(RuntimeError):
    """A simulated client failure (reliability.fail_clients)."""


def simulate_round(exp: Experiment, rnd: int) -> dict[str, float]:
    """One round: sample, configure, train (with injected faults), aggregate."""
    cfg, rel = exp.cfg, exp.cfg.reliability
    cids = sample_clients(cfg.data.num_clients, clients_per_round(cfg), cfg.seed, rnd)
    tasks = exp.server.configure(rnd, cids)
    updates: dict[int, ClientUpdate] = {}
    lost: list[int] = []
    for cid, task in tasks.items():
        if rel.dropout and numpy_rng(cfg.seed, "client-dropout", rnd, cid).random() < rel.dropout:
            lost.append(cid)
            continue
        try:
            if cid in rel.fail_clients:
                raise ClientFault(f"injected failure of client {cid}")
            updates[cid] = train_client(exp, rnd, cid, task)
        except (ClientFault, FloatingPointError) as e:
            log.warning("round %d: client %d failed: %s", rnd, cid, e)
            lost.append(cid)
    metrics = exp.server.aggregate(rnd, tasks, updates)
    metrics["dropped_clients"] = lost
    return metrics


def prepare_output_dir(out: Path, overwrite: bool, resume: bool) -> int:
    """Make ``out`` ready; return the last finished round to continue from (0: start)."""
    has_run = (out / "metrics.jsonl").exists()
    if has_run and resume:
        return -1  # decided by the checkpoint
    if has_run and not overwrite:
        raise ConfigError(f"output directory {out} already holds a run; pass --resume to "
                          "continue it, --overwrite to replace it, or set output_dir=...")
    out.mkdir(parents=True, exist_ok=True)
    for old in [out / "metrics.jsonl", out / "summary.json", *list_checkpoints(out / "checkpoints")]:
        old.unlink(missing_ok=True)
    return 0


def restore(exp: Experiment, out: Path) -> int:
    """Load the newest good checkpoint; cut metrics.jsonl back to it. Returns its round."""
    found = latest_checkpoint(out / "checkpoints")
    if found is None:
        (out / "metrics.jsonl").unlink(missing_ok=True)
        return 0
    rnd, payload = found
    exp.server.load_state_dict(payload["server"])
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    kept = [ln for ln in lines if ln.endswith("}") and json.loads(ln)["round"] <= rnd]
    (out / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))
    return rnd


RoundFn = Callable[[Experiment, int], dict]


def run(cfg: RunConfig, overwrite: bool = False, progress: bool = True,
        exp: Experiment | None = None, resume: bool = False,
        round_fn: RoundFn = simulate_round) -> dict[str, float]:
    """Run every round, writing ``config.toml``, ``clients.json``, ``metrics.jsonl``,
    ``checkpoints/`` and ``adapter/`` into the output directory; return a summary.

    With ``resume``, continue from the newest good checkpoint in the output directory.
    ``round_fn`` carries one round: in-process here, over a Flower grid in
    ``fedlora.flower``; evaluation, metrics and checkpoints are the same for both.
    """
    out = cfg.resolved_output_dir()
    done = prepare_output_dir(out, overwrite, resume)
    (out / "config.toml").write_text(to_toml(cfg))
    start = time.perf_counter()
    exp = exp or build_experiment(cfg)
    (out / "clients.json").write_text(json.dumps(
        {"budgets": exp.budgets, "num_examples": [len(c) for c in exp.data.clients],
         "test_examples": len(exp.data.test), "labels": exp.data.label_names,
         "split_sha256": split_fingerprint(exp.data.clients, exp.data.test)}, indent=1))
    fed, rel = cfg.federation, cfg.reliability
    done = restore(exp, out) if done < 0 else 0
    if done == 0:
        initial = evaluate_global(exp)
        _append(out, {"round": 0, **{f"eval_{k}": v for k, v in initial.items()},
                      "wall_time_s": time.perf_counter() - start})
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    initial = {k[5:]: v for k, v in rows[0].items() if k.startswith("eval_")}
    last_eval = next({k[5:]: v for k, v in r.items() if k.startswith("eval_")}
                     for r in reversed(rows) if "eval_accuracy" in r)
    bar = tqdm(range(done + 1, fed.rounds + 1), desc=f"{cfg.strategy.name}", unit="round",
               disable=not progress, dynamic_ncols=True, initial=done, total=fed.rounds)
    for rnd in bar:
        t0 = time.perf_counter()
        metrics = round_fn(exp, rnd)
        if rnd % fed.eval_every == 0 or rnd == fed.rounds:
            last_eval = evaluate_global(exp)
            metrics.update({f"eval_{k}": v for k, v in last_eval.items()})
        metrics["wall_time_s"] = time.perf_counter() - t0
        _append(out, {"round": rnd, **metrics})
        if rel.checkpoint_every and (rnd % rel.checkpoint_every == 0 or rnd == fed.rounds):
            save_checkpoint(out / "checkpoints", rnd, {"round": rnd, "server": exp.server.state_dict(),
                                                       "budgets": exp.budgets},
                            keep=rel.keep_checkpoints)
        bar.set_postfix(loss=f"{metrics.get('train_loss', float('nan')):.3f}",
                        acc=f"{last_eval['accuracy']:.3f}")
    save_peft_adapter(exp.server.global_task(), out / "adapter",
                      resolve_model_path(cfg.model), cfg.strategy.alpha)
    questions = exp.data.questions
    test_labels = questions.gold if questions is not None else exp.data.encoded.labels[exp.data.test]
    majority = float(np.bincount(test_labels.numpy()).max() / len(exp.data.test))
    summary = {"initial_accuracy": initial["accuracy"], "final_accuracy": last_eval["accuracy"],
               "final_loss": last_eval["loss"], "majority_accuracy": majority,
               "wall_time_s": time.perf_counter() - start, "output_dir": str(out)}
    # Written last: its presence marks a finished run (compare skips those on resume).
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _append(out: Path, record: dict) -> None:
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
