"""The ClientApp Flower runs for every message on a node (the app's ``clientapp`` component).

Light on purpose: it imports Flower and the worker channel, never torch. With node-config
``worker`` (a SuperNode in ``--isolation subprocess`` beside ``python -m fedlora.flower.worker
--socket``) the mod hands each message to the node's long-running worker, so a message costs a
Python process with Flower, not a reload of torch, the model and the data; without a worker,
each message type is handled by :mod:`.client_app` in this process, as before. (``fedlora node``
needs neither: its worker is the SuperNode's task executor, :mod:`.node_executor`.) Every
message type the full ClientApp answers is registered here too.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from .worker_link import worker_mod

app = ClientApp(mods=[worker_mod])


def in_process(msg: Message, context: Context) -> Message:
    """No worker on this node: the full ClientApp (model, data, training) answers here."""
    from .client_app import app as full

    return full(msg, context)


for register in (app.query, app.train, app.evaluate):
    register()(in_process)
