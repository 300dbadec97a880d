"""The factored SVD of a sum of low-rank products equals the dense one; truncation keeps the product."""

import pytest
import torch

from fedlora.lowrank import dense_svd, factored_svd, svd_of_product


def rand(m, n, R, seed, rank_deficient=False):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, R, generator=g, dtype=torch.float64)
    A = torch.randn(R, n, generator=g, dtype=torch.float64)
    if rank_deficient:  # half of the stacked columns repeat the others
        h = R // 2
        B[:, h:2 * h] = B[:, :h] * 0.5
        A[h:2 * h] = A[:h]
    return B, A


def best_rank(svd, r):
    return (svd.U[:, :r] * svd.S[:r]) @ svd.Vh[:r]


CASES = [(40, 30, 6, False), (25, 60, 12, False), (20, 16, 20, False), (12, 9, 30, False),
         (50, 40, 10, True), (33, 21, 8, True)]


@pytest.mark.parametrize("m, n, R, deficient", CASES)
def test_factored_matches_dense(m, n, R, deficient):
    B, A = rand(m, n, R, seed=m * n + R, rank_deficient=deficient)
    d, f = dense_svd(B, A), factored_svd(B, A)
    q = min(m, n, R)
    torch.testing.assert_close(f.S[:q], d.S[:q], rtol=1e-5, atol=1e-10 * d.S[0].item())
    # reconstructed best rank-r products agree (singular vectors may differ in sign/order
    # inside repeated values; the products do not, away from ties)
    for r in (1, 2, q // 2, q):
        if r and (r == q or d.S[r - 1] - d.S[r] > 1e-8 * d.S[0]):
            ref = best_rank(d, r)
            torch.testing.assert_close(best_rank(f, r), ref, rtol=0, atol=1e-5 * ref.norm().item() + 1e-12)
    torch.testing.assert_close(best_rank(f, f.S.numel()), B @ A, rtol=0, atol=1e-9 * (B @ A).norm().item())


def test_zero_update():
    B, A = torch.zeros(10, 4, dtype=torch.float64), torch.zeros(4, 7, dtype=torch.float64)
    for svd in (factored_svd(B, A), svd_of_product(B, A), dense_svd(B, A)):
        assert svd.S.abs().max() == 0
        assert best_rank(svd, 3).abs().max() == 0
        f = svd.truncate(3, scale=0.5)
        assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all() and (f.B @ f.A).abs().max() == 0


def test_auto_route_switches_to_dense_when_R_reaches_min_dim():
    B, A = rand(8, 6, 7, seed=1)  # R = 7 >= min(8, 6)
    s = svd_of_product(B, A)
    torch.testing.assert_close((s.U * s.S) @ s.Vh, B @ A, rtol=0, atol=1e-10)


@pytest.mark.parametrize("split", ["balanced", "all-in-B"])
def test_truncate_reproduces_the_product_at_a_given_scale(split):
    B, A = rand(30, 20, 5, seed=7)
    s = factored_svd(B, A)
    f = s.truncate(5, scale=0.25, split=split)
    torch.testing.assert_close(0.25 * f.B @ f.A, B @ A, rtol=0, atol=1e-9)
    padded = s.truncate(9, scale=0.25, split=split)  # more rank than there is: zero-padded
    assert padded.rank == 9
    torch.testing.assert_close(0.25 * padded.B @ padded.A, B @ A, rtol=0, atol=1e-9)
    if split == "all-in-B":
        torch.testing.assert_close(f.A @ f.A.T, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_are_decomposed_in_at_least_float32(dtype):
    B, A = rand(20, 15, 4, seed=3)
    for svd in (factored_svd(B.to(dtype), A.to(dtype)), dense_svd(B.to(dtype), A.to(dtype))):
        assert svd.S.dtype == torch.float32
        ref = B.to(dtype).double() @ A.to(dtype).double()
        torch.testing.assert_close(best_rank(svd, 4).double(), ref, rtol=0, atol=1e-4 * ref.norm().item())


def test_orthonormal_completion_is_orthogonal_deterministic_and_nonzero_past_the_dimension():
    from fedlora.lowrank import orthonormal_completion

    rows = torch.linalg.qr(torch.randn(7, 3, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))[0].T  # (3, 7) orthonormal
    new = orthonormal_completion(rows, 4, torch.Generator().manual_seed(5))
    full = torch.cat([rows, new])
    torch.testing.assert_close(full @ full.T, torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(new, orthonormal_completion(rows, 4, torch.Generator().manual_seed(5)))
    over = orthonormal_completion(rows, 6, torch.Generator().manual_seed(5))  # only 4 fit in R^7
    torch.testing.assert_close(over.norm(dim=1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(over[:4] @ rows.T, torch.zeros(4, 3, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("m, n, R", [(40, 30, 6), (12, 9, 30)])
def test_singular_values_match_the_dense_ones_on_both_routes(m, n, R):
    from fedlora.lowrank import singular_values

    B, A = rand(m, n, R, seed=R)
    ref = torch.linalg.svdvals(B @ A)[:min(m, n, R)]
    torch.testing.assert_close(singular_values(B, A)[:ref.numel()], ref, rtol=1e-10, atol=1e-10)
