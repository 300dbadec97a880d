"""Flower ClientApp: a device that trains the factors the server sends, within its budget.

The node declares what it is in its node-config: ``partition-id`` (which client of the
federated split it holds), optionally ``budget`` (the LoRA rank it can afford; default:
the budget the run config draws for that client) and ``device`` (where it trains, e.g.
``cuda:1``; default: the run config's ``train.device``). The server checks the first two
(:mod:`.registry`) and decides the example counts; answering who it is loads nothing.
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


def _local(context: Context) -> tuple[Experiment, int]:
    exp = _experiment(tuple(sorted(context.run_config.items())), str(context.node_config.get(NODE_DEVICE, "")))
    cid = context.node_config.get(NODE_PARTITION)
    if not isinstance(cid, int) or not 0 <= cid < len(exp.data.clients):
        raise ValueError(f"node-config {NODE_PARTITION}={cid!r} is not one of the "
                         f"{len(exp.data.clients)} clients of this run")
    return exp, cid


@app.query()
def profile(msg: Message, context: Context) -> Message:
    """Tell the server which client this node holds and what it can afford (as configured)."""
    if NODE_PARTITION not in context.node_config:
        raise ValueError(f"node-config has no {NODE_PARTITION}: say which client of the split this node holds")
    return Message(codec.encode_profile(context.node_config[NODE_PARTITION], context.node_config.get(NODE_BUDGET)),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    exp, cid = _local(context)
    rnd, task = codec.decode_task(msg.content)
    update = train_client(exp, rnd, cid, task)
    return Message(codec.encode_update(update), reply_to=msg)
