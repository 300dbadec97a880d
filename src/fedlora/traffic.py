"""Bytes on the wire: a round's traffic known before it is sent, the run's byte budget, and a
whole run's forecast (``fedlora plan``).

A round's tasks are built by the strategy before anything is sent (``configure`` is a pure
function of the global state, the round and the sampled clients), and an update carries
back the factors its task gave (less ``A`` when it was frozen) and the head: so the bytes of
round ``t`` are known exactly before it runs, counted by the same ``payload_nbytes`` as the
traffic that ``metrics.jsonl`` reports (clients that drop out only make it smaller).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .config import PrivacyConfig
from .server import FederatedServer
from .types import ClientTask, ClientUpdate, Strategy, payload_nbytes


def update_of(task: ClientTask) -> ClientUpdate:
    """The shape of the update that answers ``task`` (its factors, its head, A left out if frozen)."""
    return ClientUpdate(factors=task.factors, num_examples=1, head=task.head, freeze_A=task.freeze_A)


def tasks_traffic(tasks: Mapping[int, ClientTask]) -> tuple[int, int]:
    """(bytes down, bytes up) of a round whose tasks are ``tasks`` and whose clients all answer."""
    return (sum(payload_nbytes(t) for t in tasks.values()),
            sum(payload_nbytes(update_of(t)) for t in tasks.values()))


def round_traffic(server: FederatedServer, rnd: int) -> tuple[int, int]:
    """(bytes down, bytes up) that round ``rnd`` will move, from its tasks, before any is sent."""
    return tasks_traffic(server.configure(rnd, server.sample(rnd)))


@dataclass
class ByteBudget:
    """``federation.max_total_bytes``: bytes down + up a run may move, and how many it has."""

    limit: int
    used: float = 0.0

    @property
    def share(self) -> float:
        return self.used / self.limit

    def spend(self, metrics: Mapping[str, float]) -> None:
        self.used += metrics.get("bytes_down", 0.0) + metrics.get("bytes_up", 0.0)

    def allows(self, server: FederatedServer, rnd: int) -> bool:
        """Whether round ``rnd`` fits in what is left."""
        return self.used + sum(round_traffic(server, rnd)) <= self.limit


def forecast(build: Callable[[dict[str, tuple[int, int]]], Strategy], shapes: Mapping[str, tuple[int, int]],
             budgets: list[int], per_round: int, seed: int, rounds: int,
             privacy: PrivacyConfig | None = None) -> list[tuple[int, int]]:
    """(bytes down, bytes up) of every round of a run of the strategy ``build(shapes)`` makes, every
    client answering.

    Everything lives on the meta device (shapes, no memory, no arithmetic), and modules of one shape
    are counted once and multiplied (every method treats its modules alike). Each round's tasks are
    counted, then handed back as the updates so that state that grows (a merged delta) grows as in
    the run. A method whose aggregation reads values (a norm, a truncation by energy) keeps its state
    from there on: exact where the sizes do not depend on the data, a lower bound where they do
    (FLoRIST's merged rank).
    """
    count = Counter(shapes.values())
    one = {f"shape{i}": shape for i, shape in enumerate(count)}
    times = {f"shape{i}": n for i, n in enumerate(count.values())}
    try:
        return _count_rounds(build, one, times, budgets, per_round, seed, rounds, privacy, "meta")
    except (RuntimeError, NotImplementedError):  # tasks built from values (Fed-PLoRA): real tensors, no
        # aggregation (slow at full size; such a method's task sizes do not depend on its state)
        return _count_rounds(build, one, times, budgets, per_round, seed, rounds, privacy, "cpu")


def _count_rounds(build, one, times, budgets, per_round, seed, rounds, privacy, device) -> list[tuple[int, int]]:
    out, frozen = [], device != "meta"
    by_budget: dict[int, tuple[int, int]] = {}  # without aggregation a task's size depends on its budget only
    with torch.device(device):
        server = FederatedServer(build(one), {}, budgets, [1] * len(budgets), seed=seed, per_round=per_round,
                                 privacy=privacy)
        for rnd in range(1, rounds + 1):
            cids = server.sample(rnd)
            if frozen:
                for c in cids:
                    if budgets[c] not in by_budget:
                        by_budget[budgets[c]] = tasks_traffic({c: _repeat(server.configure(rnd, [c])[c], times)})
                out.append((sum(by_budget[budgets[c]][0] for c in cids), sum(by_budget[budgets[c]][1] for c in cids)))
                continue
            tasks = server.configure(rnd, cids)
            out.append(tasks_traffic({c: _repeat(t, times) for c, t in tasks.items()}))
            try:
                server.strategy.aggregate(rnd, {c: update_of(t) for c, t in tasks.items()})
            except (RuntimeError, NotImplementedError):  # a value read on the meta device
                frozen = True
    return out


def _repeat(task: ClientTask, times: Mapping[str, int]) -> ClientTask:
    """``task`` with each module's factors (and delta) listed ``times[module]`` times (meta views)."""
    def rep(state):
        return {f"{n}.{j}": f for n, f in state.items() for j in range(times[n])}
    return dataclasses.replace(task, factors=rep(task.factors), base_delta=rep(task.base_delta))
