"""What the coordinator of a federation of node-local data needs beyond the shared round loop:
a server experiment with no training data, example counts the nodes declare, one console line
per round, and the clients that never contributed."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from ..config import RunConfig
from ..data import ChatDataset, Dataset, TextDataset, load_dataset
from ..errors import ConfigError, check
from ..experiment import Experiment, build_experiment
from .registry import ClientRegistry

log = logging.getLogger("fedlora.flower")


def server_experiment(cfg: RunConfig) -> Experiment:
    """The model (shapes, head) and, when ``eval.server_data`` names one, a file to score on: no
    training data (``data.name`` is not read; the nodes hold the data)."""
    check("eval.where", cfg.eval.where == "clients" or bool(cfg.eval.server_data),
          f'"{cfg.eval.where}" scores on the server, which holds no data when nodes read their own: '
          'set eval.server_data or eval.where = "clients"')
    check("data.labels", cfg.data.format != "classification" or bool(cfg.data.labels),
          'nodes with their own files need the classes declared, e.g. data.labels = ["negative", "positive"]')
    ds: Dataset
    if cfg.eval.server_data:
        try:
            ds = load_dataset(dataclasses.replace(cfg.data, name=cfg.eval.server_data, partition="iid"))
        except ConfigError as e:
            raise ConfigError(f"eval.server_data: {str(e).removeprefix('data.name: ')}") from None
    elif cfg.data.format == "classification":
        ds = TextDataset([], np.zeros(0, dtype=np.int64), list(cfg.data.labels))
    else:
        ds = ChatDataset([])
    rows = len(ds.texts if isinstance(ds, TextDataset) else ds.conversations)
    empty = [np.zeros(0, dtype=np.int64)] * cfg.data.num_clients
    return build_experiment(cfg, ds, (empty, np.arange(rows), list(empty)))


def count_declared(registry: ClientRegistry, node: int, cid: int, declared: int | None, cap: int) -> None:
    """A registered node's declared example count, capped at ``cap``, where the operator's registry gives none."""
    holder = registry.holders.get(cid)
    if holder is None or holder.node_id != node:
        return
    given = registry.allowed.get(cid) if registry.allowed else None
    if given is not None and given.num_examples is not None:
        return  # the operator vouches for it
    if declared is None or declared < 1:
        log.warning("node %s (client %d) declared no example count; weighted as 1", node, cid)
        declared = 1
    registry.num_examples[cid] = min(declared, cap)
    log.warning("node %s (client %d): %d examples declared, %d counted (cap %d)", node, cid, declared,
                registry.num_examples[cid], cap)


def round_line(row: dict, rounds: int) -> str:
    """One console line about a finished round (a metrics.jsonl row)."""
    parts = [f"round {row['round']}/{rounds}"]
    if row["round"] > 0:
        answered = len(row.get("answered_clients", []))
        parts.append(f"clients answered {answered}, dropped {len(row.get('dropped_clients', []))}, "
                     f"rejected {int(row.get('rejected', 0))}" + (" (skipped)" if row.get("skipped") else ""))
        if "train_loss" in row:
            parts.append(f"train loss {row['train_loss']:.4f}")
    for k in ("eval_accuracy", "eval_rouge_l", "eval_loss", "eval_clients_accuracy"):
        if k in row:
            parts.append(f"{k[5:]} {row[k]:.4f}")
    if row["round"] > 0:
        parts.append(f"{row.get('bytes_down', 0) / 1e6:.2f} MB down, {row.get('bytes_up', 0) / 1e6:.2f} MB up")
    return ": ".join(parts[:1]) + ": " + ", ".join(parts[1:])


def never_contributed(rows: list[dict], registered: list[int]) -> list[int]:
    """Registered clients none of whose updates was aggregated in any round."""
    done: set[int] = set()
    for r in rows:
        if r["round"] > 0 and not r.get("skipped"):
            done |= set(r.get("answered_clients", [])) - set(r.get("rejected_clients", []))
    return sorted(set(registered) - done)
