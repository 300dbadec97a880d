"""raFLoRA: partition l is the product average's block l divided by c_l; an uncovered
partition keeps its previous block; equal budgets are FlexLoRA exactly."""

import pytest
import torch

import fedlora.strategies.raflora as R
from fedlora.strategies import build_strategy
from fedlora.strategies.raflora import partitions
from fedlora.types import ClientSpec

from .common import BUDGETS, EXAMPLES, SHAPES, SPECS, build, global_dense, naive_dense, train, weights

EDGES = [0, *sorted(set(BUDGETS))]  # partitions [0,2) [2,3) [3,4) [4,5)


def best(M, r):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def expected(tasks, ups, name, previous=None):
    """The naive float64 loop: Σ_l (block l of Σ p_i s_i B_i A_i) / c_l, where block l sums the
    clients with k_i >= b_l; a partition nobody trained keeps ``previous``'s block."""
    p = weights(list(ups))
    total = torch.zeros(SHAPES[name], dtype=torch.float64)
    product_average = torch.zeros_like(total)
    for lo, hi in zip(EDGES, EDGES[1:]):
        block, c_l = torch.zeros_like(total), 0.0
        for c, u in ups.items():
            if u.factors[name].rank >= hi:
                f = u.factors[name]
                block += p[c] * tasks[c].scale * f.B[:, lo:hi] @ f.A[lo:hi]
                c_l += p[c]
        product_average += block
        if c_l:
            total += block / c_l
        elif previous is not None:
            U, S, Vh = previous
            total += (U[:, lo:hi] * S[lo:hi]) @ Vh[lo:hi]
    flex = sum(p[c] * naive_dense(u.factors[name], tasks[c].scale) for c, u in ups.items())
    torch.testing.assert_close(product_average, flex, rtol=1e-12, atol=1e-12)  # the blocks split it
    return total


def test_raflora_divides_each_partition_by_its_coverage_and_keeps_uncovered_blocks(monkeypatch):
    stacks = []
    real = R.svd_of_product
    monkeypatch.setattr(R, "svd_of_product", lambda B, A: stacks.append(B @ A) or real(B, A))
    s = build("raflora")
    tasks = s.configure(1, SPECS)
    for c, t in tasks.items():  # the leading rows of one A, B = 0: partitions align from round 1
        assert all(f.rank == BUDGETS[c] and f.B.abs().sum() == 0 for f in t.factors.values())
        torch.testing.assert_close(t.factors["q"].A, tasks[1].factors["q"].A[:BUDGETS[c]], rtol=0, atol=0)
    for rnd, cids in ((1, [0, 1, 2, 3]), (2, [0, 2]), (3, [3, 0, 1])):  # round 2: nobody trains [3, 5)
        tasks = s.configure(rnd, [SPECS[c] for c in cids])
        ups = train(tasks, seed=rnd)
        previous = {n: (d.U.double(), d.S.double(), d.Vh.double()) for n, d in s.svd.items()}
        stacks.clear()
        s.aggregate(rnd, ups)
        for name, stacked in zip(SHAPES, stacks):
            ref = expected(tasks, ups, name, previous.get(name))
            torch.testing.assert_close(stacked, ref, rtol=1e-9, atol=1e-9)  # before truncation
            torch.testing.assert_close(global_dense(s, name), best(ref, 5), rtol=1e-9, atol=1e-9)
            if rnd == 2:  # the carried blocks matter: dropping them would change the result
                U, S, Vh = previous[name]
                assert ((U[:, 3:5] * S[3:5]) @ Vh[3:5]).norm() > 1e-3


def test_partition_weights_sum_to_one_and_name_the_clients_that_trained_each_partition():
    p = [EXAMPLES[c] / 90 for c in (0, 2, 3)]  # ranks 2, 3, 4 of levels 2..5
    parts = partitions([2, 3, 4], p, [2, 3, 4, 5])
    assert [(lo, hi, sorted(m)) for lo, hi, m in parts] == [(0, 2, [0, 1, 2]), (2, 3, [1, 2]), (3, 4, [2]),
                                                            (4, 5, [])]
    for _, _, members in parts[:3]:
        assert sum(members.values()) == pytest.approx(1.0, abs=1e-15)


def test_raflora_with_equal_budgets_is_flexlora_exactly():
    args = dict(shapes=SHAPES, budgets=[3] * 4, seed=0, global_rank=6, alpha=4.0)
    ra, flex = build_strategy("raflora", **args), build_strategy("flexlora", **args)
    specs = [ClientSpec(c, 3, EXAMPLES[c]) for c in range(4)]
    for rnd, cids in ((1, [0, 1, 3]), (2, [1, 2])):
        tasks = ra.configure(rnd, [specs[c] for c in cids])
        ups = train(tasks, seed=rnd)
        ra.aggregate(rnd, ups)
        flex.aggregate(rnd, ups)
        for name in SHAPES:  # FlexLoRA keeps the whole ΔW; raFLoRA its rank-3 truncation
            torch.testing.assert_close(global_dense(ra, name), best(global_dense(flex, name), 3),
                                       rtol=1e-12, atol=1e-12)
        a, b = ra.configure(rnd + 1, specs), flex.configure(rnd + 1, specs)
        for c in range(4):  # what every client starts from next is the same
            assert a[c].scale == b[c].scale
            for name in SHAPES:
                fa, fb = a[c].factors[name], b[c].factors[name]
                torch.testing.assert_close(fa.B @ fa.A, fb.B @ fb.A, rtol=1e-12, atol=1e-12)
