"""The in-process carrier: every round's clients train one after another on one shared model.

The base model is loaded once; a client round only swaps the (small) LoRA factors and
head in and out, so nothing of size ``W0`` is copied per client. Faults can be injected
(``reliability.dropout``, ``reliability.fail_clients``) to test what a real deployment meets.
"""

from __future__ import annotations

import logging

from .experiment import Experiment, train_client
from .seeding import numpy_rng
from .types import ClientUpdate

log = logging.getLogger("fedlora.simulate")


class ClientFault(RuntimeError):
    """A simulated client failure (reliability.fail_clients)."""


def simulate_round(exp: Experiment, rnd: int) -> dict[str, float]:
    """One round: sample, configure, train (with injected faults), aggregate."""
    cfg, rel = exp.cfg, exp.cfg.reliability
    tasks = exp.server.configure(rnd, exp.server.sample(rnd))
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
