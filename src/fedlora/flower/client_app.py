"""Flower ClientApp: a device that trains the factors the server sends, within its budget.

The node declares what it is in its node-config: ``partition-id`` (which client of the
federated split it holds), optionally ``budget`` (the LoRA rank it can afford; default:
the budget the run config draws for that client) and ``device`` (where it trains, e.g.
``cuda:1``; default: the run config's ``train.device``).
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ..device import check_device_name
from ..experiment import Experiment, build_experiment, train_client
from . import codec
from .run_config import NODE_BUDGET, NODE_DEVICE, NODE_PARTITION, config_from_run_config

app = ClientApp()


@lru_cache(maxsize=2)
def _experiment(config_key: tuple, device: str) -> Experiment:
    """Load the base model and data once per process (keyed by the run config and device)."""
    cfg = config_from_run_config(dict(config_key))
    if device:
        check_device_name(f"node-config {NODE_DEVICE}", device)
        cfg.train.device = device
    return build_experiment(cfg)


def _local(context: Context) -> tuple[Experiment, int, int]:
    exp = _experiment(tuple(sorted(context.run_config.items())), str(context.node_config.get(NODE_DEVICE, "")))
    cid = int(context.node_config.get(NODE_PARTITION, 0))
    if not 0 <= cid < len(exp.data.clients):
        raise ValueError(f"node-config {NODE_PARTITION}={cid} is outside the "
                         f"{len(exp.data.clients)} clients of this run")
    budget = int(context.node_config.get(NODE_BUDGET, exp.budgets[cid]))
    return exp, cid, budget


@app.query()
def profile(msg: Message, context: Context) -> Message:
    """Tell the server who this node is and what it can afford."""
    exp, cid, budget = _local(context)
    return Message(codec.encode_profile(cid, budget, len(exp.data.clients[cid])), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    exp, cid, _ = _local(context)
    rnd, task = codec.decode_task(msg.content)
    update = train_client(exp, rnd, cid, task)
    return Message(codec.encode_update(update), reply_to=msg)
