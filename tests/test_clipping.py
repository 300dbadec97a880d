"""Clipping measured on ΔW from Gram matrices: equal to the dense norm, and the bound holds."""

import math

import pytest
import torch

from fedlora.clipping import change_norm_sq, clip_update, product_norm_sq, update_norm
from fedlora.types import ClientTask, ClientUpdate, Factors


def rand_factors(r, m, n, g, scale=1.0):
    return Factors(A=torch.randn(r, n, generator=g, dtype=torch.float64) * scale,
                   B=torch.randn(m, r, generator=g, dtype=torch.float64) * scale)


@pytest.mark.parametrize("seed", range(5))
def test_gram_norm_equals_dense_norm_for_mixed_ranks(seed):
    g = torch.Generator().manual_seed(seed)
    for r, m, n in [(1, 7, 3), (4, 9, 12), (16, 5, 6)]:  # r > min(m, n) included
        f = rand_factors(r, m, n, g)
        assert product_norm_sq(f.B, f.A) == pytest.approx(float(torch.linalg.norm(f.B @ f.A) ** 2), rel=1e-10)
        f2 = rand_factors(r, m, n, g)
        dense = 0.7 * (f2.B @ f2.A - f.B @ f.A)
        assert change_norm_sq(f, f2, 0.7) == pytest.approx(float(torch.linalg.norm(dense) ** 2), rel=1e-10)


@pytest.mark.parametrize("seed", range(8))
def test_clipped_update_respects_the_bound(seed):
    g = torch.Generator().manual_seed(seed)
    ranks = [2, 5, 3]
    shapes = [(8, 6), (4, 9), (7, 7)]
    sent = {f"m{i}": rand_factors(r, m, n, g) for i, (r, (m, n)) in enumerate(zip(ranks, shapes))}
    trained = {k: Factors(A=f.A + torch.randn(f.A.shape, generator=g, dtype=torch.float64) * 3,
                          B=f.B + torch.randn(f.B.shape, generator=g, dtype=torch.float64) * 3)
               for k, f in sent.items()}
    task = ClientTask(factors=sent, scale=1.3, head={"h": torch.zeros(3, dtype=torch.float64)})
    update = ClientUpdate(factors=trained, num_examples=5, head={"h": torch.ones(3, dtype=torch.float64)})
    dense_norm = math.sqrt(sum(float(torch.linalg.norm(1.3 * (trained[k].B @ trained[k].A - f.B @ f.A)) ** 2)
                               for k, f in sent.items()) + 3.0)
    assert update_norm(task, update) == pytest.approx(dense_norm, rel=1e-9)
    C = dense_norm / (2 + seed)
    clipped, before = clip_update(task, update, C)
    assert before == pytest.approx(dense_norm, rel=1e-9)
    after = update_norm(task, clipped)
    assert after <= C * (1 + 1e-6)
    assert after >= C * 0.999  # shrunk to the bound, not to nothing
    same, _ = clip_update(task, update, dense_norm * 2)
    assert same is update  # under the bound: untouched
