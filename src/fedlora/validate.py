"""Screening client updates before aggregation: who sent it, and what it contains.

Every strategy's updates pass through :func:`screen_updates`; a bad update is set
aside with a typed reason and the round goes on with the rest. Replies that arrive as
bytes (Flower) are decoded first, in :func:`decode_updates`: one that does not decode
is a rejection too, never an exception that ends the run.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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
    MALFORMED = "malformed"  # did not decode: missing or ill-typed fields, unknown keys, tensors that are no LoRA pair
    STALE = "stale"  # does not carry this round's nonce: replayed, or an answer to another task
    TOO_LARGE = "too_large"  # a tensor holds more bytes than the task's shape and dtype allow
    BAD_METRICS = "bad_metrics"  # too many metrics, a long name, or a value not finite or out of bounds


# What a client may report besides its factors: a few short-named, finite, bounded numbers
# (train_loss, steps, ...). A value outside them says the client is broken or lying; its
# whole update is set aside, so no bad number reaches the round's metrics.
MAX_METRICS, MAX_METRIC_NAME, METRIC_BOUND = 32, 64, 1e6


class RejectedReply(ValueError):
    """Raised by a decoder for a reply that is bad in a way that has its own reason."""

    def __init__(self, reason: Reject, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Rejection:
    cid: int
    reason: Reject
    detail: str

    def __str__(self) -> str:
        return f"client {self.cid}: {self.reason.value} ({self.detail})"


def metrics_problem(metrics: Mapping[str, Any]) -> str | None:
    """What is wrong with a client's metrics (count, names, values), or None."""
    if len(metrics) > MAX_METRICS:
        return f"{len(metrics)} metrics, at most {MAX_METRICS}"
    for k, v in metrics.items():
        if not isinstance(k, str) or len(k) > MAX_METRIC_NAME:
            return f"metric name {str(k)[:40]!r}... longer than {MAX_METRIC_NAME} characters"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > METRIC_BOUND:
            return f"metric {k!r} = {v!r}"[:120] + f" is not a finite number in [-{METRIC_BOUND:g}, {METRIC_BOUND:g}]"
    return None


def check_update(task: ClientTask, update: ClientUpdate, max_examples: int,
                 fingerprint: str = "") -> Rejection | None:
    """The first thing wrong with ``update`` as an answer to ``task``, or None."""
    def bad(reason: Reject, detail: str) -> Rejection:
        return Rejection(-1, reason, detail)

    if task.nonce and update.nonce != task.nonce:
        return bad(Reject.STALE, "it does not carry the nonce of this round's task")
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
        want = task.head[name]
        if t.shape != want.shape:
            return bad(Reject.HEAD_MISMATCH, f"head {name} is {tuple(t.shape)}, expected {tuple(want.shape)}")
        if t.dtype != want.dtype:  # averaging it in would change the global head's dtype
            return bad(Reject.WRONG_DTYPE, f"head {name} is {t.dtype}, expected {want.dtype}")
        if not torch.isfinite(t).all():
            return bad(Reject.NON_FINITE, f"head {name} holds NaN or Inf")
    if not 0 < update.num_examples <= max_examples:
        return bad(Reject.BAD_EXAMPLE_COUNT, f"{update.num_examples} not in [1, {max_examples}]")
    if (problem := metrics_problem(update.metrics)) is not None:
        return bad(Reject.BAD_METRICS, problem)
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


def decode_updates(
    tasks: Mapping[int, ClientTask],
    replies: Iterable[tuple[int, Any]],
    decode: Callable[[Any, ClientTask], ClientUpdate],
) -> tuple[list[tuple[int, ClientUpdate]], list[Rejection]]:
    """Decode each (client id, reply) as an answer to that client's task, in a guarded step.

    A reply from a client that got no task, or one whose decoding raises anything (the
    bytes came from outside: every failure is the sender's), is rejected with a typed
    reason; the rest are returned for :func:`screen_updates`.
    """
    decoded: list[tuple[int, ClientUpdate]] = []
    rejected: list[Rejection] = []
    for cid, reply in replies:
        if cid not in tasks:
            rejected.append(Rejection(cid, Reject.UNEXPECTED_CLIENT, "no task was sent to it"))
            continue
        try:
            decoded.append((cid, decode(reply, tasks[cid])))
        except RejectedReply as e:
            rejected.append(Rejection(cid, e.reason, str(e)[:200]))
        except Exception as e:  # noqa: BLE001 - untrusted input: any failure is a malformed reply
            detail = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            rejected.append(Rejection(cid, Reject.MALFORMED, detail))
    return decoded, rejected
