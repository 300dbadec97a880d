"""FLoRA: stacking equals the sum of products; the merged delta stays exact."""

import torch

from .common import SHAPES, SPECS, build, global_dense, naive_dense, train, weights


def test_flora_stack_equals_sum_of_products_and_recompression_is_lossless():
    s = build("flora")
    ref = {n: torch.zeros(SHAPES[n], dtype=torch.float64) for n in SHAPES}
    for rnd in range(1, 4):  # enough rounds for the delta's rank to pass min(m, n) = 7
        tasks = s.configure(rnd, SPECS)
        for t in tasks.values():  # fresh LoRA every round: B = 0, carrying the merged delta
            assert all(f.B.abs().sum() == 0 for f in t.factors.values())
        ups = train(tasks, seed=rnd)
        s.aggregate(rnd, ups)
        p = weights(range(4))
        for n in SHAPES:
            for c in range(4):
                ref[n] += p[c] * naive_dense(ups[c].factors[n], tasks[c].scale)
            torch.testing.assert_close(global_dense(s, n), ref[n], rtol=1e-9, atol=1e-9)
            assert s.delta[n].rank <= min(SHAPES[n])
    assert s.configure(4, SPECS[:1])[0].base_delta["q"].rank == s.delta["q"].rank
