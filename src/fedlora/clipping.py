"""Bounding what one client can do to the model: norms measured on ``ΔW`` itself, never formed.

A client's effect on a layer of the global model is ``D = s (B' A' - B A)`` (trained minus
sent factors), ``s`` the scale at which its factors act on the global model
(:func:`effect_scale`: FSLoRA's client trains at ``s r / k`` but moves the global pair at
``s``). The Frobenius norm comes from two small Gram matrices, never from the ``m × n``
matrix: with ``P = [B', -B]`` and ``Q = [A'; A]``, ``||P Q||² = sum((PᵀP) ∘ (Q Qᵀ))``.

Methods that average the factors separately (FSLoRA, FedIT, HetLoRA, ...) are bounded on
the factors too: ``mean(B') mean(A')`` is not ``mean(B' A')``, so a pair whose own product
does not move (round 1: ``A' = 0``, any ``B'``) can still drag the averaged ``B`` anywhere.
Their measure is ``max(||D||, s g ||(ΔA, ΔB)||_F)``, ``g = max(||A||_2, ||B||_2)`` of the
sent pair: the factor increments in the units of ``ΔW`` (``s ||B ΔA + ΔB A|| <= √2 s g
||(ΔA, ΔB)||``), so one clip bounds both (docs/algorithms.md, "What one client can do").

Robust aggregation (on by default): an adaptive clip that tracks a quantile of the
measures (Andrew et al., 2021, as TensorFlow Federated's robust aggregator does), started
at the first round's median, and zeroing of updates far above the round's median.
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


def _towards(sent: torch.Tensor, trained: torch.Tensor, c: float) -> torch.Tensor:
    """``sent + c (trained - sent)`` in float64 (a 1e38 increment stays finite), in ``trained``'s dtype."""
    return (sent.double() + c * (trained.double() - sent.double())).to(trained.dtype)


def factor_norm(task: ClientTask, update: ClientUpdate) -> float:
    """``sqrt(Σ_layers (s g ||(ΔA, ΔB)||_F)² + ||Δhead||²)``: the factor increments at the scale at
    which they move the global pair, ``g = max(||A||_F, ||B||_F)`` of the sent pair (1 for a zero pair; the
    Frobenius norm bounds the spectral one and costs no eigen-solve)."""
    scale, total = effect_scale(task), head_change_sq(task, update)
    for n, f in task.factors.items():
        u = update.factors[n]
        g = max(float(torch.linalg.norm(f.A.double())), float(torch.linalg.norm(f.B.double()))) or 1.0
        inc = float(((u.A.double() - f.A.double()) ** 2).sum() + ((u.B.double() - f.B.double()) ** 2).sum())
        total += (scale * g) ** 2 * inc
    return math.sqrt(total)


def effect_norm(task: ClientTask, update: ClientUpdate) -> float:
    """The measure of a factor-averaging method: the larger of the product change and :func:`factor_norm`."""
    return max(update_norm(task, update), factor_norm(task, update))


def shrink(task: ClientTask, update: ClientUpdate, c: float) -> ClientUpdate:
    """The update whose factor and head increments are ``c`` times the client's."""
    factors = {n: Factors(A=_towards(s.A, update.factors[n].A, c), B=_towards(s.B, update.factors[n].B, c))
               for n, s in task.factors.items()}
    head = {k: _towards(t, update.head[k], c) for k, t in task.head.items()}
    return ClientUpdate(factors=factors, num_examples=update.num_examples, head=head,
                        metrics=dict(update.metrics), fingerprint=update.fingerprint,
                        freeze_A=update.freeze_A)


def change_poly(task: ClientTask, update: ClientUpdate) -> tuple[float, float, float]:
    """``(a2, a3, a4)`` with ``update_norm(shrink(c))² = a2 c² + 2 a3 c³ + a4 c⁴``, from ``r × r`` Grams.

    Per layer ``s(B'A' - BA) = c X + c² Y`` with ``X = s(ΔB A + B ΔA)``, ``Y = s ΔB ΔA``; the
    head's increment adds ``c² ||Δhead||²``. One pass, so a clip needs no re-measuring.
    """
    scale = effect_scale(task)
    a2, a3, a4 = head_change_sq(task, update), 0.0, 0.0
    for n, f in task.factors.items():
        A, B = f.A.double(), f.B.double()
        dA, dB = update.factors[n].A.double() - A, update.factors[n].B.double() - B
        P, Q = torch.cat([dB, B], 1), torch.cat([A, dA], 0)  # X = s P Q
        a2 += scale**2 * product_norm_sq(P, Q)
        a3 += scale**2 * float(((P.T @ dB) * (Q @ dA.T)).sum())
        a4 += scale**2 * product_norm_sq(dB, dA)
    return a2, a3, a4


def clip_update(task: ClientTask, update: ClientUpdate, max_norm: float, norm: float | None = None,
                iters: int = 60, factors: bool = False) -> tuple[ClientUpdate, float]:
    """Shrink the update so that its measure (the ``ΔW`` norm, or with ``factors`` :func:`effect_norm`)
    is at most ``max_norm``; return (update, norm before).

    The factor term is linear in the shrink factor ``c``, the ``ΔW`` norm a quartic in ``c``
    (:func:`change_poly`), so ``c`` is found by bisection on that polynomial; the lower end
    always satisfies the bound (``c = 0`` is no change), so the result never exceeds it.
    """
    norm = (effect_norm if factors else update_norm)(task, update) if norm is None else norm
    if norm <= max_norm:
        return update, norm
    a2, a3, a4 = change_poly(task, update)

    def fits(c: float) -> bool:
        return a2 * c * c + 2 * a3 * c**3 + a4 * c**4 <= max_norm**2

    lo, hi = 0.0, min(1.0, max_norm / factor_norm(task, update)) if factors else 1.0
    if fits(hi):
        return shrink(task, update, hi), norm
    for _ in range(iters):
        mid = (lo + hi) / 2
        if fits(mid):
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
    ``bound *= exp(-lr * (share of updates at or under the bound - quantile))``.
    ``bound = 0``: not set yet; the first round's median sets it (no unit to guess)."""

    bound: float = 0.0
    quantile: float = 0.5
    lr: float = 0.2

    def bound_for(self, norms: Sequence[float]) -> float:
        """This round's bound (the first round's median norm when none is set)."""
        if self.bound <= 0 and norms:
            self.bound = statistics.median(norms) or 0.0
        return self.bound

    def step(self, norms: Sequence[float]) -> None:
        if norms:
            under = sum(n <= self.bound for n in norms) / len(norms)
            self.bound *= math.exp(-self.lr * (under - self.quantile))


def bound_updates(tasks: Mapping[int, ClientTask], updates: Mapping[int, ClientUpdate], clip_norm: float,
                  outlier_factor: float, factors: bool = False, norms: Mapping[int, float] | None = None,
                  ) -> tuple[dict[int, ClientUpdate], dict[int, float], dict[str, float]]:
    """Zero the outliers (measure above ``outlier_factor`` x the round's median; needs 3
    updates), then clip the rest to ``clip_norm`` (0: no clip). The measure is the ``ΔW`` norm,
    or with ``factors`` :func:`effect_norm`. Returns (updates, each norm before, metrics).
    ``norms``: each update's measure, if already known."""
    measure = effect_norm if factors else update_norm
    norms = dict(norms) if norms is not None else {c: measure(tasks[c], u) for c, u in updates.items()}
    out, metrics, zeroed = dict(updates), {}, set()
    if outlier_factor > 0 and len(norms) >= 3:
        limit = outlier_factor * statistics.median(norms.values())
        zeroed = {c for c, n in norms.items() if n > limit}
        out.update({c: shrink(tasks[c], updates[c], 0.0) for c in zeroed})  # as if it had not trained
        metrics["zeroed"] = float(len(zeroed))
    if clip_norm > 0:
        kept = [c for c in out if c not in zeroed]
        out.update({c: clip_update(tasks[c], out[c], clip_norm, norms[c], factors=factors)[0] for c in kept})
        metrics["clipped"] = float(sum(norms[c] > clip_norm for c in kept))
    return out, norms, metrics
