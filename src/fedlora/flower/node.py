"""A node's side of a Flower run: its experiment and the bodies of the ClientApp's handlers.

A node holds either its own data (node-config ``data-path``, optionally ``eval-path``: read with
the run's ``data.format``/``data.columns``/``data.labels``; nothing else is read) or, in the
shared-data mode of simulations and benchmarks, the slice of the run's ``data.name`` that its
``partition-id`` names. Either way it trains through the same :func:`fedlora.experiment.train_client`.
The ClientApp and a long-running worker call these functions with the same arguments.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import lru_cache

import numpy as np
from flwr.app import RecordDict

from ..data import Dataset, TextDataset, load_dataset
from ..device import check_device_name
from ..errors import ConfigError
from ..experiment import Experiment, build_experiment, evaluate_clients, holdout, train_client
from . import codec
from .run_config import (
    NODE_BUDGET,
    NODE_DATA,
    NODE_DEVICE,
    NODE_EVAL_DATA,
    NODE_PARTITION,
    config_from_run_config,
    example_cap,
)

log = logging.getLogger("fedlora.flower.node")


class NodeDataError(ValueError):
    """The node's own data cannot be used; one line naming the node-config key and the file."""


def _read(cfg, key: str, path: str) -> Dataset:
    try:
        ds = load_dataset(dataclasses.replace(cfg.data, name=path, partition="iid"))
    except ConfigError as e:  # its message names data.name; here the file is the node's own
        raise NodeDataError(f"node-config {key}={path}: {str(e).removeprefix('data.name: ')}") from None
    log.warning("node: read %d rows from %s", _size(ds), path)
    return ds


def _size(ds: Dataset) -> int:
    return len(ds.texts if isinstance(ds, TextDataset) else ds.conversations)


def _concat(a: Dataset, b: Dataset) -> Dataset:
    rows = "texts" if isinstance(a, TextDataset) else "conversations"
    labels = None if a.labels is None or b.labels is None else np.concatenate([a.labels, b.labels])
    return dataclasses.replace(a, **{rows: getattr(a, rows) + getattr(b, rows)}, labels=labels, groups=None,
                               held_out=None)


def own_data(cfg, cid: int, data_path: str, eval_path: str = "") -> tuple[Dataset, tuple]:
    """The node's rows and its split: client ``cid`` trains on ``data_path`` less its held-out part
    (``eval_path``, else the file's own test split, else a seeded ``eval.client_fraction``)."""
    if cfg.data.format == "classification" and not cfg.data.labels:
        raise ConfigError("data.labels: nodes with their own files need the classes declared, e.g. "
                          'data.labels = ["negative", "neutral", "positive"]')
    ds = _read(cfg, NODE_DATA, data_path)
    n = _size(ds)
    if eval_path:
        ds = _concat(ds, _read(cfg, NODE_EVAL_DATA, eval_path))
        train, test = np.arange(n), np.arange(n, _size(ds))
    elif ds.held_out is not None:
        train, test = np.flatnonzero(~ds.held_out), np.flatnonzero(ds.held_out)
    else:
        train, test = holdout(np.arange(n), cfg.eval.client_fraction, cfg.seed, cid)
    clients = [np.zeros(0, dtype=np.int64)] * cfg.data.num_clients
    own = list(clients)
    clients[cid], own[cid] = train, test
    return ds, (clients, np.zeros(0, dtype=np.int64), own)


@lru_cache(maxsize=4)
def _experiment(run_key: tuple, device: str, cid: int, data_path: str, eval_path: str) -> Experiment:
    """Base model and data once per process, keyed by what they depend on (shared mode: not the node)."""
    cfg = config_from_run_config(dict(run_key))
    if device:
        check_device_name(f"node-config {NODE_DEVICE}", device)
        cfg.train.device = device
    if not data_path:
        return build_experiment(cfg)
    return build_experiment(cfg, *own_data(cfg, cid, data_path, eval_path))


def node_experiment(run_config: dict, node_config: dict) -> tuple[Experiment, int]:
    """(the node's experiment, the client it holds), built once per process."""
    cid = node_config.get(NODE_PARTITION)
    if not isinstance(cid, int) or isinstance(cid, bool):
        raise ValueError(f"node-config has no integer {NODE_PARTITION}: say which client of the run this node holds")
    data_path = str(node_config.get(NODE_DATA, ""))
    exp = _experiment(tuple(sorted(run_config.items())), str(node_config.get(NODE_DEVICE, "")),
                      cid if data_path else -1, data_path, str(node_config.get(NODE_EVAL_DATA, "")))
    if not 0 <= cid < len(exp.data.clients):
        raise ValueError(f"node-config {NODE_PARTITION}={cid!r} is not one of the "
                         f"{len(exp.data.clients)} clients of this run")
    return exp, cid


def declared_count(exp: Experiment, cid: int, run_config: dict) -> int:
    """The node's training examples, at most the run's ``example-cap`` (the server caps them too)."""
    return min(len(exp.data.clients[cid]), example_cap(run_config))


def handle_profile(run_config: dict, node_config: dict) -> RecordDict:
    """Who the node is. A node with its own data also loads it now (a bad file fails registration) and
    declares its example count; in the shared mode this loads nothing."""
    if NODE_PARTITION not in node_config:
        raise ValueError(f"node-config has no {NODE_PARTITION}: say which client of the run this node holds")
    count = None
    if node_config.get(NODE_DATA):
        exp, cid = node_experiment(run_config, node_config)
        count = declared_count(exp, cid, run_config)
    return codec.encode_profile(node_config[NODE_PARTITION], node_config.get(NODE_BUDGET), count)


def handle_train(content: RecordDict, run_config: dict, node_config: dict) -> RecordDict:
    exp, cid = node_experiment(run_config, node_config)
    rnd, task = codec.decode_task(content)
    update = train_client(exp, rnd, cid, task)
    update = dataclasses.replace(update, num_examples=min(update.num_examples, declared_count(exp, cid, run_config)))
    return codec.encode_update(update)


def handle_evaluate(content: RecordDict, run_config: dict, node_config: dict) -> RecordDict:
    """The global model scored on the node's own held-out rows (none: an error, so the server skips it)."""
    exp, cid = node_experiment(run_config, node_config)
    _, task = codec.decode_task(content)
    scores = evaluate_clients(exp, task, [cid])
    if cid not in scores:
        raise ValueError("this node holds no held-out rows (eval.client_fraction = 0 and no eval-path)")
    return codec.encode_scores(*scores[cid])
