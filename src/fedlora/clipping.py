"""Clipping what one client can do to the model: norms measured on ``ΔW`` itself, never formed.

A client's effect on a layer is ``D = s (B' A' - B A)`` (trained minus sent factors).
Its Frobenius norm comes from two small Gram matrices, never from the ``m × n`` matrix:
with ``P = [B', -B]`` and ``Q = [A'; A]``, ``||P Q||² = sum((PᵀP) ∘ (Q Qᵀ))``.
"""

from __future__ import annotations

import math

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


def update_norm(task: ClientTask, update: ClientUpdate) -> float:
    """Norm of a client's whole change: every layer's ``ΔW`` and its head increment."""
    total = sum(change_norm_sq(task.factors[n], update.factors[n], task.scale) for n in task.factors)
    total += sum(float(((update.head[k] - task.head[k]).double() ** 2).sum()) for k in task.head)
    return math.sqrt(total)


def shrink(task: ClientTask, update: ClientUpdate, c: float) -> ClientUpdate:
    """The update whose factor and head increments are ``c`` times the client's."""
    factors = {n: Factors(A=s.A + c * (update.factors[n].A - s.A), B=s.B + c * (update.factors[n].B - s.B))
               for n, s in task.factors.items()}
    head = {k: t + c * (update.head[k] - t) for k, t in task.head.items()}
    return ClientUpdate(factors=factors, num_examples=update.num_examples, head=head,
                        metrics=dict(update.metrics), fingerprint=update.fingerprint,
                        freeze_A=update.freeze_A)


def clip_update(task: ClientTask, update: ClientUpdate, max_norm: float,
                iters: int = 60) -> tuple[ClientUpdate, float]:
    """Shrink the update so that its ``ΔW`` norm is at most ``max_norm``; return (update, norm).

    ``ΔW`` is quadratic in the factor increments, so the shrink factor is found by
    bisection on ``[0, 1]``; the lower end always satisfies the bound (``c = 0`` is no
    change), so the result never exceeds it.
    """
    norm = update_norm(task, update)
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
    sq += sum(float(((update.head[k] - t).double() ** 2).sum()) for k, t in task.head.items())
    return math.sqrt(sq)


def clip_increment(task: ClientTask, update: ClientUpdate, max_norm: float) -> ClientUpdate:
    """Scale the uploaded increment (factors and head) to L2 norm at most ``max_norm``:
    the per-client sensitivity bound that DP noise is calibrated to."""
    norm = increment_norm(task, update)
    return update if norm <= max_norm else shrink(task, update, max_norm / norm)
