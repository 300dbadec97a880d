"""Per-round diagnostics of any method: how faithfully it aggregated, and what it holds.

``fidelity`` is the aggregation error ``||Σ_i p_i M_i - M_g||_F / ||Σ_i p_i M_i||_F``, with
``M_i = D_i + s_i B_i A_i`` client i's effective adapter after local training (its task's
frozen ``base_delta`` ``D_i`` and its uploaded pair at its task's scale) and ``M_g`` the new
global adapter (``global_task()``: base delta plus scaled pair). Exact methods give 0.
The spectrum fields describe ``M_g``: the share of ``Σ σ²`` in the top 4/8/16/32 singular
directions, and the effective rank of Roy & Vetterli (2007), ``exp(H(σ / Σ σ))``.

Both are computed from the factors alone, over a fixed seeded sample of at most
:data:`MAX_MODULES` modules, so a round's cost is ``O((m + n) R²)`` per sampled module
(``R`` the stacked rank of the clients' and the global terms), with no ``m × n`` matrix
while ``R < min(m, n)``; past that (FLoRA's delta late in a run) the dense product is
the cheaper exact route and is taken, as :func:`fedlora.lowrank.svd_of_product` does.
The Gram route resolves a fidelity down to about 1e-8 (float64 cancellation in
``||X||² + ||Y||² - 2⟨X, Y⟩``); an exact method reads 0 to that resolution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .lowrank import singular_values, stack
from .seeding import numpy_rng
from .state import round_weights
from .types import ClientTask, ClientUpdate, Factors

MAX_MODULES = 8
TOP = (4, 8, 16, 32)  # energy_top<k> fields


def sample_modules(names: Sequence[str], seed: int, k: int = MAX_MODULES) -> list[str]:
    """At most ``k`` module names, the same for every round of a run (sorted)."""
    names = sorted(names)
    if len(names) <= k:
        return names
    picked = numpy_rng(seed, "diagnostics-modules").choice(len(names), k, replace=False)
    return sorted(names[i] for i in picked)


def _terms(task: ClientTask, factors: Factors, name: str) -> list[tuple[float, Factors]]:
    """``M = D + s B A`` as (weight, pair) terms (the delta's scale is folded into its B)."""
    delta = task.base_delta.get(name)
    return ([(1.0, delta)] if delta is not None and delta.rank else []) + [(task.scale, factors)]


def _leads(f0: Factors, f: Factors) -> bool:
    """``f0`` is ``f``'s leading rank block (or ``f`` itself)."""
    r = f0.rank
    return (0 < r <= f.rank and f0.shape == f.shape and f0.A.dtype == f.A.dtype
            and torch.equal(f0.A, f.A[:r]) and torch.equal(f0.B, f.B[:, :r]))


@dataclass
class _Term:
    pair: Factors
    ref: float  # its weight in Σ p_i M_i
    diff: float  # its weight in Σ p_i M_i - M_g


def _add(terms: list[_Term], f: Factors, ref: float, diff: float) -> None:
    """Add the pair ``f`` with its weights, folding it, or its leading block, into an equal
    pair already listed: the round's tasks usually carry one base delta (its rank then counts
    once, not N times), and FLoRA's new global delta starts with that delta (which then
    cancels instead of being stacked)."""
    for t in terms:
        if f.rank and _leads(t.pair, f):
            t.ref, t.diff = t.ref + ref, t.diff + diff
            f = Factors(A=f.A[t.pair.rank:], B=f.B[:, t.pair.rank:])
    if f.rank:
        terms.append(_Term(f, ref, diff))


def fidelity_terms(tasks: Mapping[int, ClientTask], updates: Mapping[int, ClientUpdate],
                   glob: ClientTask, name: str) -> tuple[float, float]:
    """(``||Σ p_i M_i - M_g||²``, ``||Σ p_i M_i||²``) of one module, from one pair of Grams."""
    cids, p = round_weights(updates)
    terms: list[_Term] = []
    for c, w in zip(cids, p):
        for s, f in _terms(tasks[c], updates[c].factors[name], name):
            _add(terms, f, w * s, w * s)
    for s, f in _terms(glob, glob.factors[name], name):
        _add(terms, f, 0.0, -s)
    P = torch.cat([t.pair.B.double() for t in terms], 1)  # (m, R)
    Q = torch.cat([t.pair.A.double() for t in terms], 0)  # (R, n)
    ranks = torch.tensor([t.pair.rank for t in terms])
    ref = torch.tensor([t.ref for t in terms], dtype=torch.float64).repeat_interleave(ranks)  # (R,)
    diff = torch.tensor([t.diff for t in terms], dtype=torch.float64).repeat_interleave(ranks)
    if P.shape[1] >= min(P.shape[0], Q.shape[1]):
        # a stacked rank past min(m, n) (FLoRA's delta late in a run) makes the R × R Grams
        # larger and slower than the m × n product itself: the dense route is then cheaper
        return float(((P * diff) @ Q).square().sum()), float(((P * ref) @ Q).square().sum())
    G = (P.T @ P) * (Q @ Q.T)  # ||P diag(w) Q||² = wᵀ G w: the m × n product is never formed
    return float((diff @ G @ diff).clamp_min(0.0)), float((ref @ G @ ref).clamp_min(0.0))


def effective_rank(S: Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(H(σ / Σ σ))``; 0 for a zero matrix."""
    total = float(S.sum())
    if total <= 0:
        return 0.0
    q = S[S > 0].double() / total
    return math.exp(float(-(q * q.log()).sum()))


def energy_shares(S: Tensor, top: Sequence[int] = TOP) -> dict[str, float]:
    """Share of ``Σ σ²`` in the ``k`` largest singular values, per ``k`` (0 for a zero matrix)."""
    e = S.double() ** 2
    total = float(e.sum())
    cum = torch.cumsum(torch.sort(e, descending=True).values, 0)
    return {f"energy_top{k}": (float(cum[min(k, len(cum)) - 1]) / total if total > 0 and len(cum) else 0.0)
            for k in top}


def round_diagnostics(tasks: Mapping[int, ClientTask], updates: Mapping[int, ClientUpdate],
                      glob: ClientTask, modules: Sequence[str]) -> dict[str, float]:
    """``fidelity`` (pooled over ``modules``) and the global adapter's spectrum (averaged)."""
    err = ref = 0.0
    spectra: list[dict[str, float]] = []
    for name in modules:
        e, r = fidelity_terms(tasks, updates, glob, name)
        err, ref = err + e, ref + r
        weights, pairs = zip(*_terms(glob, glob.factors[name], name))
        S = singular_values(*stack(list(pairs), list(weights)))
        spectra.append({"effective_rank": effective_rank(S), **energy_shares(S)})
    out = {"fidelity": math.sqrt(err / ref) if ref > 0 else (0.0 if err == 0 else math.inf)}
    for key in spectra[0] if spectra else ():
        out[key] = sum(s[key] for s in spectra) / len(spectra)
    return out
