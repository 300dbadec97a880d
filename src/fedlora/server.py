"""The server's round logic around a strategy: client sampling, the dense head, traffic.

Both carriers (the in-process simulator and the Flower ServerApp) drive this object,
so a round means the same thing on one machine and across many.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from . import state as S
from .seeding import numpy_rng
from .types import ClientSpec, ClientTask, ClientUpdate, Strategy, payload_nbytes


def sample_clients(num_clients: int, per_round: int, seed: int, rnd: int) -> list[int]:
    """``per_round`` distinct client ids for round ``rnd``, sorted; all when per_round >= n."""
    if per_round >= num_clients:
        return list(range(num_clients))
    return sorted(numpy_rng(seed, "sample", rnd).choice(num_clients, per_round, replace=False).tolist())


class FederatedServer:
    """A strategy plus the parts every method shares: head averaging and byte counts."""

    def __init__(self, strategy: Strategy, head: Mapping[str, Tensor], budgets: Sequence[int],
                 num_examples: Sequence[int]) -> None:
        self.strategy = strategy
        self.head = {k: v.detach().clone() for k, v in head.items()}
        self.budgets = list(budgets)
        self.num_examples = list(num_examples)

    def spec(self, cid: int) -> ClientSpec:
        return ClientSpec(cid=cid, budget=self.budgets[cid], num_examples=self.num_examples[cid])

    def configure(self, rnd: int, cids: Sequence[int]) -> dict[int, ClientTask]:
        tasks = self.strategy.configure(rnd, [self.spec(c) for c in cids])
        for task in tasks.values():
            task.head = {k: v.clone() for k, v in self.head.items()}
        return tasks

    def aggregate(self, rnd: int, tasks: Mapping[int, ClientTask],
                  updates: Mapping[int, ClientUpdate]) -> dict[str, float]:
        """Fold the updates into the global state; return the round's metrics."""
        cids = sorted(updates)
        metrics: dict[str, float] = {
            "clients": float(len(cids)),
            "bytes_down": float(sum(payload_nbytes(tasks[c]) for c in tasks)),
            "bytes_up": float(sum(payload_nbytes(updates[c]) for c in cids)),
        }
        if not cids:
            return metrics
        weights = S.example_weights([updates[c].num_examples for c in cids])
        if self.head:
            self.head = S.weighted_sum_tensors([updates[c].head for c in cids], weights)
        losses = [updates[c].metrics.get("train_loss", float("nan")) for c in cids]
        metrics["train_loss"] = float(sum(w * x for w, x in zip(weights, losses)))
        metrics.update(self.strategy.aggregate(rnd, updates))
        return metrics

    def global_task(self) -> ClientTask:
        task = self.strategy.global_task()
        task.head = {k: v.clone() for k, v in self.head.items()}
        return task

    def state_dict(self) -> dict:
        return {"strategy": self.strategy.state_dict(),
                "head": {k: v.clone() for k, v in self.head.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.strategy.load_state_dict(sd["strategy"])
        self.head = {k: torch.as_tensor(v).clone() for k, v in sd["head"].items()}
