"""Flower ClientApp: thin handlers over :mod:`.node` (which a long-running worker can call too).

The node declares what it is in its node-config: ``partition-id`` (its client of the run),
optionally ``budget`` (the LoRA rank it can afford; default: the run config's draw) and
``device`` (e.g. ``cuda:1``), and, holding its own data, ``data-path`` (and optionally
``eval-path``). The server checks what it is told (:mod:`.registry`) and decides example counts.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from .node import handle_evaluate, handle_profile, handle_train

app = ClientApp()


@app.query()
def profile(msg: Message, context: Context) -> Message:
    """Tell the server which client this node holds and what it can afford (as configured)."""
    return Message(handle_profile(context.run_config, context.node_config), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(handle_train(msg.content, context.run_config, context.node_config), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on this node's own held-out rows."""
    return Message(handle_evaluate(msg.content, context.run_config, context.node_config), reply_to=msg)
