"""Screening client updates before aggregation: who sent it, and what it contains.

Every strategy's updates pass through :func:`screen_updates`; a bad update is set
aside with a typed reason and the round goes on with the rest.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .types import ClientTask, ClientUpdate


class Reject(str, enum.Enum):
    UNEXPECTED_CLIENT = "unexpected_client"  # no task was sent to it this round
    DUPLICATE = "duplicate"  # a second update from the same client in one round
    MISSING_MODULES = "missing_modules"
    EXTRA_MODULES = "extra_modules"
    WRONG_SHAPE = "wrong_shape"  # wrong rank, transposed matrix, wrong layer
    WRONG_DTYPE = "wrong_dtype"
    NON_FINITE = "non_finite"  # NaN or Inf anywhere
    BAD_EXAMPLE_COUNT = "bad_example_count"  # not positive, or above the client's cap
    HEAD_MISMATCH = "head_mismatch"
    FINGERPRINT = "fingerprint_mismatch"  # trained on a different base model


@dataclass(frozen=True)
class Rejection:
    cid: int
    reason: Reject
    detail: str

    def __str__(self) -> str:
        return f"client {self.cid}: {self.reason.value} ({self.detail})"


def check_update(task: ClientTask, update: ClientUpdate, max_examples: int,
                 fingerprint: str = "") -> Rejection | None:
    """The first thing wrong with ``update`` as an answer to ``task``, or None."""
    def bad(reason: Reject, detail: str) -> Rejection:
        return Rejection(-1, reason, detail)

    if fingerprint and update.fingerprint != fingerprint:
        return bad(Reject.FINGERPRINT, "update comes from a different base model")
    missing = sorted(set(task.factors) - set(update.factors))
    if missing:
        return bad(Reject.MISSING_MODULES, f"{len(missing)} missing, e.g. {missing[0]}")
    extra = sorted(set(update.factors) - set(task.factors))
    if extra:
        return bad(Reject.EXTRA_MODULES, f"{len(extra)} unexpected, e.g. {extra[0]}")
    for name, sent in task.factors.items():
        got = update.factors[name]
        for part, want, have in (("A", sent.A, got.A), ("B", sent.B, got.B)):
            if have.shape != want.shape:
                return bad(Reject.WRONG_SHAPE, f"{name}.{part} is {tuple(have.shape)}, "
                                               f"expected {tuple(want.shape)}")
            if have.dtype != want.dtype:
                return bad(Reject.WRONG_DTYPE, f"{name}.{part} is {have.dtype}, expected {want.dtype}")
            if not torch.isfinite(have).all():
                return bad(Reject.NON_FINITE, f"{name}.{part} holds NaN or Inf")
    if set(update.head) != set(task.head):
        return bad(Reject.HEAD_MISMATCH, "head parameters differ from the ones sent")
    for name, t in update.head.items():
        if t.shape != task.head[name].shape or not torch.isfinite(t).all():
            return bad(Reject.HEAD_MISMATCH, f"head {name} has a wrong shape or non-finite values")
    if not 0 < update.num_examples <= max_examples:
        return bad(Reject.BAD_EXAMPLE_COUNT, f"{update.num_examples} not in [1, {max_examples}]")
    return None


def screen_updates(
    tasks: Mapping[int, ClientTask],
    updates: Iterable[tuple[int, ClientUpdate]],
    max_examples: Mapping[int, int],
    fingerprint: str = "",
) -> tuple[dict[int, ClientUpdate], list[Rejection]]:
    """Split a round's (client id, update) pairs into valid updates and rejections.

    A client that answers twice loses both answers: the server cannot tell which is real.
    """
    valid: dict[int, ClientUpdate] = {}
    rejected: list[Rejection] = []
    seen: set[int] = set()
    for cid, update in updates:
        if cid not in tasks:
            rejected.append(Rejection(cid, Reject.UNEXPECTED_CLIENT, "no task was sent to it"))
            continue
        if cid in seen:
            valid.pop(cid, None)
            rejected.append(Rejection(cid, Reject.DUPLICATE, "more than one update this round"))
            continue
        seen.add(cid)
        problem = check_update(tasks[cid], update, max_examples[cid], fingerprint)
        if problem is None:
            valid[cid] = update
        else:
            rejected.append(Rejection(cid, problem.reason, problem.detail))
    return valid, rejected
