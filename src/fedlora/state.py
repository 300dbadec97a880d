"""Pure operations on LoRA factors: init, take/scatter along the rank, weighted means.

Every function here is small, allocation-explicit and tested against a naive float64
loop in ``tests/test_state.py``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from .types import ClientUpdate, Factors, LoRAState


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """Forward scale of plain LoRA (``alpha / r``) or rsLoRA (``alpha / sqrt(r)``)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def init_factors(
    shapes: Mapping[str, tuple[int, int]], rank: int, generator: torch.Generator
) -> LoRAState:
    """Fresh LoRA pairs: ``A`` Kaiming-uniform (as LoRA/PEFT do), ``B = 0``.

    ``shapes`` maps module path -> ``(out_features, in_features)``. Modules are
    initialised in sorted order so the draw does not depend on dict order.
    """
    state: LoRAState = {}
    for name in sorted(shapes):
        out_f, in_f = shapes[name]
        # kaiming_uniform_(a=sqrt(5)) on a (rank, in) matrix: bound = 1/sqrt(in).
        bound = 1.0 / math.sqrt(in_f)
        A = (torch.rand(rank, in_f, generator=generator) * 2 - 1) * bound
        state[name] = Factors(A=A, B=torch.zeros(out_f, rank))
    return state


def take(state: LoRAState, index: Tensor) -> LoRAState:
    """Rank sub-block: ``B[:, I]`` and ``A[I, :]`` of every module, with one shared ``I``."""
    return {n: Factors(A=f.A[index].clone(), B=f.B[:, index].clone()) for n, f in state.items()}


def fold_rest(state: LoRAState, trained: Tensor, rank: int, scale: float) -> LoRAState:
    """The slots outside ``trained`` as a frozen base delta (scale folded into ``B``), so a client
    training ``take(state, trained)`` at ``scale`` starts from ``W0 + scale·B·A`` exactly; a
    low-rank side path, never added into ``W0`` (works over any base, quantised included)."""
    rest = torch.ones(rank, dtype=torch.bool)
    rest[trained] = False
    if not rest.any():
        return {}
    return {n: Factors(A=f.A, B=scale * f.B) for n, f in take(state, rest.nonzero().squeeze(1)).items()}


def dense_as_factors(W: Tensor) -> Factors:
    """A dense ``m × n`` delta as a pair with ``B @ A = W`` exactly: an identity on the smaller
    side (what a dense delta on the wire becomes; :class:`fedlora.lora.LoRALinear` holds any
    delta whose factors outweigh it as the product)."""
    m, n = W.shape
    if n <= m:
        return Factors(A=torch.eye(n, dtype=W.dtype), B=W)
    return Factors(A=W, B=torch.eye(m, dtype=W.dtype))


def scatter(block: LoRAState, index: Tensor, rank: int) -> LoRAState:
    """Inverse of :func:`take`: place a rank-``len(I)`` block into zeros of rank ``rank``."""
    out: LoRAState = {}
    for n, f in block.items():
        A = f.A.new_zeros(rank, f.A.shape[1])
        B = f.B.new_zeros(f.B.shape[0], rank)
        A[index] = f.A
        B[:, index] = f.B
        out[n] = Factors(A=A, B=B)
    return out


def scatter_add_(target: LoRAState, block: LoRAState, index: Tensor, alpha: float = 1.0) -> None:
    """In place ``target += alpha * scatter(block, index, rank)``, without the rank-``rank``
    buffer: cost and memory scale with ``len(I)``, not with the target's rank."""
    _check_same_modules(target, block)
    for n, f in target.items():
        f.A.index_add_(0, index, block[n].A.to(f.A.dtype), alpha=alpha)
        f.B.index_add_(1, index, block[n].B.to(f.B.dtype), alpha=alpha)


def pad_rank(state: LoRAState, rank: int) -> LoRAState:
    """Zero-pad every module's factors to ``rank`` (the leading block keeps its place)."""
    return scatter(state, torch.arange(next(iter(state.values())).rank), rank) if state else {}


def truncate_rank(state: LoRAState, rank: int) -> LoRAState:
    """The leading rank-``rank`` block of every module."""
    return take(state, torch.arange(rank))


def subtract(a: LoRAState, b: LoRAState) -> LoRAState:
    """Per-module ``a - b`` (same ranks)."""
    _check_same_modules(a, b)
    return {n: Factors(A=a[n].A - b[n].A, B=a[n].B - b[n].B) for n in a}


def weighted_sum(states: Sequence[LoRAState], weights: Sequence[float]) -> LoRAState:
    """``sum_i w_i * state_i`` per module and factor; all states must have equal ranks."""
    if not states or len(states) != len(weights):
        raise ValueError("weighted_sum needs one weight per state and at least one state")
    for s in states[1:]:
        _check_same_modules(states[0], s)
    out: LoRAState = {}
    for n in states[0]:
        A = torch.zeros_like(states[0][n].A)
        B = torch.zeros_like(states[0][n].B)
        for s, w in zip(states, weights):
            A.add_(s[n].A, alpha=float(w))
            B.add_(s[n].B, alpha=float(w))
        out[n] = Factors(A=A, B=B)
    return out


def weighted_sum_tensors(
    tensors: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> dict[str, Tensor]:
    """``sum_i w_i * t_i`` per key (dense parameters such as a classifier head)."""
    if not tensors or len(tensors) != len(weights):
        raise ValueError("weighted_sum_tensors needs one weight per entry and at least one entry")
    keys = set(tensors[0])
    if any(set(t) != keys for t in tensors[1:]):
        raise ValueError("weighted_sum_tensors: entries have different keys")
    out = {k: torch.zeros_like(tensors[0][k]) for k in sorted(keys)}
    for t, w in zip(tensors, weights):
        for k in out:
            out[k].add_(t[k], alpha=float(w))
    return out


# How a padded average of leading blocks is formed: the mean of the padded factors
# themselves, or the current state plus the mean of the padded increments (a no-op
# round is then a no-op: high-rank slots are not shrunk by clients that never held them).
PaddedForm = Literal["factors", "increments"]


def padded_mean(current: LoRAState, states: Sequence[LoRAState], weights: Sequence[float],
                form: PaddedForm = "factors") -> LoRAState:
    """``Σ w_i pad(state_i)`` ("factors") or ``current + Σ w_i pad(state_i - current[:r_i])``
    ("increments"), where ``state_i`` is a leading block of ``current`` after training."""
    rank = next(iter(current.values())).rank
    if form == "factors":
        return weighted_sum([pad_rank(s, rank) for s in states], weights)
    if form != "increments":
        raise ValueError(f"padded form must be 'factors' or 'increments', got {form!r}")
    # in the wider of the global's and the uploads' dtypes (float64 uploads stay exact, as in "factors")
    dt = functools.reduce(torch.promote_types, [f.B.dtype for s in states for f in s.values()],
                          next(iter(current.values())).B.dtype)
    out = {n: Factors(A=f.A.to(dt, copy=True), B=f.B.to(dt, copy=True)) for n, f in current.items()}
    for s, w in zip(states, weights):
        r = torch.arange(next(iter(s.values())).rank)
        scatter_add_(out, subtract(s, take(current, r)), r, w)
    return out


def example_weights(num_examples: Sequence[int]) -> list[float]:
    """Aggregation weights ``p_i = n_i / sum_j n_j`` over the clients of a round."""
    total = sum(num_examples)
    if total <= 0:
        raise ValueError("the round's clients hold no examples")
    return [n / total for n in num_examples]


def round_weights(updates: Mapping[int, ClientUpdate]) -> tuple[list[int], list[float]]:
    """The round's client ids in a fixed (sorted) order and their weights ``p_i``."""
    cids = sorted(updates)
    return cids, example_weights([updates[c].num_examples for c in cids])


def clone(state: LoRAState) -> LoRAState:
    return {n: Factors(A=f.A.clone(), B=f.B.clone()) for n, f in state.items()}


def to_plain(state: LoRAState) -> dict[str, dict[str, Tensor]]:
    """``{module: {"A": A, "B": B}}`` (cloned): a ``state_dict`` entry of dicts and tensors
    only, so a checkpoint holds no custom objects."""
    return {n: {"A": f.A.clone(), "B": f.B.clone()} for n, f in state.items()}


def from_plain(plain: Mapping[str, Mapping[str, Tensor]]) -> LoRAState:
    """Inverse of :func:`to_plain` (cloned)."""
    return {n: Factors(A=f["A"].clone(), B=f["B"].clone()) for n, f in plain.items()}


def dense(f: Factors, scale: float = 1.0) -> Tensor:
    """The dense update ``scale * B @ A`` (for references and small layers only)."""
    return scale * (f.B @ f.A)


def _check_same_modules(a: Mapping[str, Factors], b: Mapping[str, Factors]) -> None:
    if set(a) != set(b):
        missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"module sets differ: missing {missing[:3]}, extra {extra[:3]}")
