"""Fed-PLoRA: every client starts from the global model (trained modules + folded delta);
per-module averages over the clients that trained them; untouched modules stay bit-identical;
all k_i = R is FedIT's factor averaging."""

import pytest
import torch

from fedlora.errors import ConfigError
from fedlora.sketch import sketch_indices
from fedlora.state import weighted_sum
from fedlora.strategies import build_strategy
from fedlora.strategies.plora import PLoRASettings
from fedlora.types import Factors

from .common import BUDGETS, SHAPES, SPECS, build, global_dense, train, weights

R = 6  # common.build's global rank; budgets 2..5 < R


def in_float64(s, seed=9):
    """A float64 global with nonzero B, so that the fold and the averages are not trivial."""
    g = torch.Generator().manual_seed(seed)
    s.factors = {n: Factors(A=f.A.double(), B=torch.randn(f.B.shape, generator=g, dtype=torch.float64))
                 for n, f in s.factors.items()}


def test_plora_every_client_starts_from_the_global_model():
    s = build("plora")
    in_float64(s)
    tasks = s.configure(3, SPECS)
    for c, t in tasks.items():
        K = sketch_indices(0, 3, c, R, BUDGETS[c])
        assert t.scale == s.scale == 4.0 / R  # one global scale for everyone
        for name in SHAPES:
            f, d = t.factors[name], t.base_delta[name]
            assert torch.equal(f.A, s.factors[name].A[K]) and torch.equal(f.B, s.factors[name].B[:, K])
            assert f.rank == BUDGETS[c] and d.rank == R - BUDGETS[c]  # download: all R modules
            torch.testing.assert_close(t.scale * f.B @ f.A + d.B @ d.A, global_dense(s, name), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module_weights", ["examples", "uniform"])
def test_plora_averages_each_module_over_its_trainers_and_leaves_untrained_modules_bit_identical(module_weights):
    s = build("plora", PLoRASettings(module_weights=module_weights))
    in_float64(s)
    untouched = 0
    for rnd, cids in ((1, [0, 2]), (2, [1, 2, 3]), (3, [3])):  # partial participation
        before = {n: Factors(A=f.A.clone(), B=f.B.clone()) for n, f in s.factors.items()}
        tasks = s.configure(rnd, [SPECS[c] for c in cids])
        ups = train(tasks, seed=rnd)
        s.aggregate(rnd, ups)
        p = weights(cids) if module_weights == "examples" else {c: 1.0 for c in cids}
        K = {c: sketch_indices(0, rnd, c, R, BUDGETS[c]).tolist() for c in cids}
        for name in SHAPES:  # the naive float64 loop, module by module
            g, old = s.factors[name], before[name]
            for j in range(R):
                Q = [c for c in cids if j in K[c]]
                if not Q:
                    untouched += 1
                    assert torch.equal(g.A[j], old.A[j]) and torch.equal(g.B[:, j], old.B[:, j])
                    continue
                den = sum(p[c] for c in Q)
                a = sum(p[c] * ups[c].factors[name].A[K[c].index(j)] for c in Q) / den
                b = sum(p[c] * ups[c].factors[name].B[:, K[c].index(j)] for c in Q) / den
                torch.testing.assert_close(g.A[j], a, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(g.B[:, j], b, rtol=1e-12, atol=1e-12)
    assert untouched > 0  # the rounds above leave some modules untrained


def test_plora_with_every_budget_at_the_global_rank_is_fedit():
    s = build_strategy("plora", SHAPES, BUDGETS, seed=0, global_rank=2, alpha=4.0)  # k_i = min(b_i, 2) = R
    in_float64(s)
    for rnd, cids in ((1, [0, 1, 3]), (2, [1, 2])):
        tasks = s.configure(rnd, [SPECS[c] for c in cids])
        assert all(t.base_delta == {} and t.factors["q"].rank == 2 for t in tasks.values())  # nothing folded
        ups = train(tasks, seed=rnd)
        fedit = weighted_sum([ups[c].factors for c in cids], [weights(cids)[c] for c in cids])
        s.aggregate(rnd, ups)
        for name in SHAPES:
            torch.testing.assert_close(s.factors[name].A, fedit[name].A, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(s.factors[name].B, fedit[name].B, rtol=1e-12, atol=1e-12)


def test_plora_module_weights_are_validated():
    with pytest.raises(ConfigError, match="strategy.plora.module_weights"):
        build("plora", PLoRASettings(module_weights="median"))
