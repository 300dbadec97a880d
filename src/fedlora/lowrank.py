"""The SVD of a sum of low-rank products, without forming the dense matrix.

``ΔW = 𝐁 𝐀`` with ``𝐁`` (m × R) and ``𝐀`` (R × n) stacked from several LoRA pairs.
Thin QR ``𝐁 = Q_B R_B`` and ``𝐀ᵀ = Q_A R_A`` and the SVD of the small core
``R_B R_Aᵀ = U' Σ V'ᵀ`` give ``ΔW = (Q_B U') Σ (Q_A V')ᵀ`` exactly, in
``O((m + n) R² + R³)`` time and no ``m × n`` buffer. When ``R ≥ min(m, n)`` the dense
SVD is no more expensive, so :func:`svd_of_product` switches to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from .types import Factors

# Where the singular values go when an SVD becomes a LoRA pair: sqrt(Σ) into each factor,
# or all of Σ into B with an orthonormal A (as FlexLoRA's authors do).
SigmaSplit = Literal["balanced", "all-in-B"]


@dataclass
class SVD:
    U: Tensor  # (m, q) orthonormal columns
    S: Tensor  # (q,) non-increasing, >= 0
    Vh: Tensor  # (q, n) orthonormal rows

    def truncate(self, rank: int, scale: float = 1.0, split: SigmaSplit = "balanced") -> Factors:
        """Rank-``rank`` factors with ``scale * B @ A`` = the best rank-``rank`` approximation.

        ``split`` puts ``sqrt(Σ)`` in each factor ("balanced") or all of ``Σ`` in ``B``
        with orthonormal ``A`` ("all-in-B", as FlexLoRA's authors do). Ranks beyond the
        numerically nonzero singular values (:func:`numerical_rank`: a rank excess, or a
        rank-deficient ``ΔW``) get ``B`` columns of zero (the product is unchanged) and ``A``
        rows orthogonal to the kept ones, of a fresh LoRA init's norm: a zero pair would get
        zero gradient in both factors, so the client would train fewer ranks than it was given.
        """
        if split not in get_args(SigmaSplit):
            raise ValueError(f"sigma split must be one of {get_args(SigmaSplit)}, got {split!r}")
        q = min(rank, numerical_rank(self.S, max(self.U.shape[0], self.Vh.shape[1])))
        U, S, Vh = self.U[:, :q], self.S[:q], self.Vh[:q]
        if split == "balanced":
            root = (S / scale).sqrt()
            B, A = U * root, root[:, None] * Vh
        else:
            B, A = U * (S / scale), Vh
        pad = rank - q
        if pad:
            fresh = orthonormal_completion(Vh, pad, torch.Generator().manual_seed(PAD_SEED)) * INIT_ROW_NORM
            B = torch.cat([B, B.new_zeros(B.shape[0], pad)], 1)
            A = torch.cat([A, fresh.to(A.dtype)], 0)
        return Factors(A=A.contiguous(), B=B.contiguous())


def numerical_rank(S: Tensor, size: int) -> int:
    """How many of the non-increasing ``S`` are nonzero relative to the largest (numpy's
    ``matrix_rank`` tolerance ``σ_max · size · eps``); the rest are round-off of a zero."""
    if S.numel() == 0:
        return 0
    tol = S.max() * size * torch.finfo(S.dtype).eps
    return int((S > tol).sum())


PAD_SEED = 0  # pad rows are a fixed function of the kept ones: every server pads alike
# Expected row norm of the Kaiming-uniform A of ``state.init_factors`` (bound 1/sqrt(n):
# E||a||² = n · bound² / 3 = 1/3), so a padded rank starts like a fresh LoRA rank.
INIT_ROW_NORM = 3**-0.5


def orthonormal_completion(rows: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` unit rows orthogonal to the orthonormal ``rows`` (q, n) and to each other.

    Only ``n - q`` such rows exist; any beyond are seeded random unit rows (not orthogonal,
    but non-zero, so the ranks they serve still train). Cost ``O(n q count)``, no ``n × n``.
    """
    q, n = rows.shape
    Z = torch.randn(n, count, generator=generator, dtype=rows.dtype).to(rows.device)  # (n, count)
    free = min(count, n - q)
    for _ in range(2):  # project twice: one pass leaves rounding-level overlap with ``rows``
        Z[:, :free] -= rows.T @ (rows @ Z[:, :free])
    Q = torch.linalg.qr(Z[:, :free])[0]  # (n, free)
    extra = Z[:, free:] / Z[:, free:].norm(dim=0)
    return torch.cat([Q, extra], 1).T


def _working(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """Both factors in one dtype LAPACK supports (half precisions are computed in float32)."""
    dtype = torch.promote_types(torch.promote_types(B.dtype, A.dtype), torch.float32)
    return B.to(dtype), A.to(dtype)


def dense_svd(B: Tensor, A: Tensor) -> SVD:
    """Reference path: form ``B @ A`` and take its thin SVD."""
    B, A = _working(B, A)
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    return SVD(U, S, Vh)


def _core(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``Q_B``, ``Q_A`` and the small core ``R_B R_Aᵀ`` with ``B @ A = Q_B core Q_Aᵀ``."""
    B, A = _working(B, A)
    Qb, Rb = torch.linalg.qr(B)  # (m, k), (k, R) with k = min(m, R)
    Qa, Ra = torch.linalg.qr(A.T)  # (n, k'), (k', R) with k' = min(n, R)
    return Qb, Qa, Rb @ Ra.T


def factored_svd(B: Tensor, A: Tensor) -> SVD:
    """SVD of ``B @ A`` from thin QRs of the factors and an ``R × R`` core SVD."""
    Qb, Qa, core = _core(B, A)
    Uc, S, Vch = torch.linalg.svd(core)
    return SVD(Qb @ Uc, S, (Qa @ Vch.T).T)


def singular_values(B: Tensor, A: Tensor) -> Tensor:
    """The singular values of ``B @ A`` (non-increasing): from the factored core while
    ``R < min(m, n)``, from the dense product otherwise (as :func:`svd_of_product`)."""
    if B.shape[1] >= min(B.shape[0], A.shape[1]):
        B, A = _working(B, A)
        return torch.linalg.svdvals(B @ A)
    return torch.linalg.svdvals(_core(B, A)[2])


def svd_of_product(B: Tensor, A: Tensor) -> SVD:
    """The cheaper exact route: factored while ``R < min(m, n)``, dense otherwise."""
    m, R = B.shape
    n = A.shape[1]
    return factored_svd(B, A) if R < min(m, n) else dense_svd(B, A)


def energy_rank(S: Tensor, energy: float) -> int:
    """The smallest ``k`` with ``Σ_{j≤k} σ_j² ≥ energy · Σ_j σ_j²`` (``S`` non-increasing).

    ``energy >= 1`` keeps every nonzero component (round-off cannot leave the cumulative sum
    short of its total); when every ``σ`` is 0 there is nothing to keep: 0.
    """
    nonzero = int((S > 0).sum())
    if energy >= 1 or nonzero == 0:
        return nonzero
    cum = (S.double() ** 2).cumsum(0)
    return min(int(torch.searchsorted(cum, cum[-1:] * energy).item()) + 1, nonzero)


def stack(parts: list[Factors], weights: list[float]) -> tuple[Tensor, Tensor]:
    """``𝐁 = [w_1 B_1, …]`` and ``𝐀 = [A_1; …]`` so that ``𝐁 𝐀 = Σ w_i B_i A_i`` exactly."""
    B = torch.cat([w * f.B for f, w in zip(parts, weights)], 1)
    A = torch.cat([f.A for f in parts], 0)
    return B, A


def add_to_delta(delta: Factors | None, parts: list[Factors], weights: list[float]) -> Factors:
    """A cumulative frozen delta plus ``Σ w_i B_i A_i``, kept as stacked factors.

    The stacked rank grows by ``Σ r_i`` per call; once it reaches ``min(m, n)`` the sum is
    re-factored exactly (:func:`svd_of_product`, balanced split, scale 1), so it never
    exceeds ``min(m, n)``. ``delta`` None: there is nothing yet.
    """
    old = [delta] if delta is not None else []
    B, A = stack(old + parts, [1.0] * len(old) + weights)
    if B.shape[1] >= min(B.shape[0], A.shape[1]):  # lossless re-factoring keeps the rank <= min(m, n)
        d = svd_of_product(B, A)
        return d.truncate(d.S.numel(), 1.0, "balanced")
    return Factors(A=A, B=B)
