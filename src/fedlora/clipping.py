"""Bounding what one client can do to the model: norms measured on ``ΔW`` itself, never formed.

A client's effect on a layer of the global model is ``D = s (B' A' - B A)`` (trained minus
sent factors), ``s`` the scale at which its factors act on the global model
(:func:`effect_scale`: FSLoRA's client trains at ``s r / k`` but moves the global pair at
``s``). The Frobenius norm comes from two small Gram matrices, never from the ``m × n``
matrix: with ``P = [B', -B]`` and ``Q = [A'; A]``, ``||P Q||² = sum((PᵀP) ∘ (Q Qᵀ))``.

Robust aggregation on request: a fixed clip, an adaptive one that tracks a quantile of the
updates' norms (Andrew et al., 2021, as TensorFlow Federated's robust aggregator does),
and zeroing of updates whose norm is far above the round's median.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .types import ClientTask, ClientUpdate, Factors


def product_norm_sq(B: torch.Tensor, A: torch.Tensor) -> float:
    """``||B @ A||_F²`` from the ``r × r`` Gram matrices (float64)."""
    B, A = B.double(), A.double()
    return float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0.0))


def change_norm_sq(sent: Factors, trained: Factors, scale: float) -> float:
    """``||scale (B' A' - B A)||_F²`` without forming an ``m × n`` matrix."""
    P = torch.cat([trained.B, -sent.B], 1)
    Q = torch.cat([trained.A, sent.A], 0)
    return scale**2 * product_norm_sq(P, Q)


def effect_scale(task: ClientTask) -> float:
    """The scale at which a client's factor change moves the global model."""
    return task.scale if task.effect_scale is None else task.effect_scale


def update_norm(task: ClientTask, update: ClientUpdate) -> float:
    """Norm of a client's whole change to the global model: every layer's ``ΔW`` and its head increment."""
    scale = effect_scale(task)
    total = sum(change_norm_sq(task.factors[n], update.factors[n], scale) for n in task.factors)
    return math.sqrt(total + head_change_sq(task, update))


def head_change_sq(task: ClientTask, update: ClientUpdate) -> float:
    """Squared L2 norm of the head's increment (it is trained and averaged as is, unscaled)."""
    return sum(float(((update.head[k] - t).double() ** 2).sum()) for k, t in task.head.items())


def shrink(task: ClientTask, update: ClientUpdate, c: float) -> ClientUpdate:
    """The update whose factor and head increments are ``c`` times the client's."""
    factors = {n: Factors(A=s.A + c * (update.factors[n].A - s.A), B=s.B + c * (update.factors[n].B - s.B))
               for n, s in task.factors.items()}
    head = {k: t + c * (update.head[k] - t) for k, t in task.head.items()}
    return ClientUpdate(factors=factors, num_examples=update.num_examples, head=head,
                        metrics=dict(update.metrics), fingerprint=update.fingerprint,
                        freeze_A=update.freeze_A)


def clip_update(task: ClientTask, update: ClientUpdate, max_norm: float, norm: float | None = None,
                iters: int = 60) -> tuple[ClientUpdate, float]:
    """Shrink the update so that its ``ΔW`` norm is at most ``max_norm``; return (update, norm).

    ``ΔW`` is quadratic in the factor increments, so the shrink factor is found by
    bisection on ``[0, 1]``; the lower end always satisfies the bound (``c = 0`` is no
    change), so the result never exceeds it. ``norm``: the update's norm, if known.
    """
    norm = update_norm(task, update) if norm is None else norm
    if norm <= max_norm:
        return update, norm
    lo, hi = 0.0, min(1.0, max_norm / norm * 2)
    while update_norm(task, shrink(task, update, hi)) <= max_norm and hi < 1.0:
        lo, hi = hi, min(1.0, hi * 2)
    for _ in range(iters):
        mid = (lo + hi) / 2
        if update_norm(task, shrink(task, update, mid)) <= max_norm:
            lo = mid
        else:
            hi = mid
    return shrink(task, update, lo), norm


def increment_norm(task: ClientTask, update: ClientUpdate) -> float:
    """L2 norm of everything a client uploads as change: factor and head increments."""
    sq = sum(float(((update.factors[n].A - f.A).double() ** 2).sum())
             + float(((update.factors[n].B - f.B).double() ** 2).sum()) for n, f in task.factors.items())
    return math.sqrt(sq + head_change_sq(task, update))


def clip_increment(task: ClientTask, update: ClientUpdate, max_norm: float) -> ClientUpdate:
    """Scale the uploaded increment (factors and head) to L2 norm at most ``max_norm``:
    the per-client sensitivity bound that DP noise is calibrated to."""
    norm = increment_norm(task, update)
    return update if norm <= max_norm else shrink(task, update, max_norm / norm)


@dataclass
class AdaptiveClip:
    """A clip bound that follows the ``quantile`` of the updates' norms: after each round,
    ``bound *= exp(-lr * (share of updates at or under the bound - quantile))``."""

    bound: float = 1.0
    quantile: float = 0.5
    lr: float = 0.2

    def step(self, norms: Sequence[float]) -> None:
        if norms:
            under = sum(n <= self.bound for n in norms) / len(norms)
            self.bound *= math.exp(-self.lr * (under - self.quantile))


def bound_updates(tasks: Mapping[int, ClientTask], updates: Mapping[int, ClientUpdate], clip_norm: float,
                  outlier_factor: float) -> tuple[dict[int, ClientUpdate], dict[int, float], dict[str, float]]:
    """Zero the outliers (norm above ``outlier_factor`` x the round's median; needs 3 updates),
    then clip the rest to ``clip_norm`` (0: no clip). Returns (updates, each norm before, metrics)."""
    norms = {c: update_norm(tasks[c], u) for c, u in updates.items()}
    out, metrics, zeroed = dict(updates), {}, set()
    if outlier_factor > 0 and len(norms) >= 3:
        limit = outlier_factor * statistics.median(norms.values())
        zeroed = {c for c, n in norms.items() if n > limit}
        out.update({c: shrink(tasks[c], updates[c], 0.0) for c in zeroed})  # as if it had not trained
        metrics["zeroed"] = float(len(zeroed))
    if clip_norm > 0:
        kept = [c for c in out if c not in zeroed]
        out.update({c: clip_update(tasks[c], out[c], clip_norm, norms[c])[0] for c in kept})
        metrics["clipped"] = float(sum(norms[c] > clip_norm for c in kept))
    return out, norms, metrics
