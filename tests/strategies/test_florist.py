"""FLoRIST: at τ = 1 the merged pair is Σ p_i s_i B_i A_i and its σ a dense SVD's; at τ < 1
the energy rule's rank and the best approximation of that rank (Eckart–Young)."""

import pytest
import torch

import fedlora.strategies.florist as F
from fedlora.errors import ConfigError
from fedlora.strategies.florist import FLoRISTSettings
from fedlora.types import ClientUpdate

from .common import SHAPES, SPECS, build, global_dense, naive_dense, train, weights

ROUNDS = [[0, 1, 3], [1, 2], [0, 2, 3]]  # partial participation, unequal ranks and weights


def round_sum(tasks, ups, name):
    """The naive float64 loop: Σ p_i s_i B_i A_i over the round's clients."""
    p = weights(list(ups))
    return sum(p[c] * naive_dense(ups[c].factors[name], tasks[c].scale) for c in ups)


def energy_rule(S, tau):
    e = (S**2).cumsum(0) / (S**2).sum()
    return next(k + 1 for k in range(len(S)) if e[k] >= tau)


def test_florist_at_full_energy_merges_the_exact_sum_and_its_singular_values_are_a_dense_svds(monkeypatch):
    seen = []
    real = F.svd_of_product
    monkeypatch.setattr(F, "svd_of_product", lambda B, A: seen.append(real(B, A)) or seen[-1])
    s = build("florist", FLoRISTSettings(energy=1.0))
    ref = {n: torch.zeros(SHAPES[n], dtype=torch.float64) for n in SHAPES}
    for rnd, cids in enumerate(ROUNDS, 1):
        tasks = s.configure(rnd, [SPECS[c] for c in cids])
        for c, t in tasks.items():  # a fresh LoRA of the client's own rank, carrying the merged base
            assert all(f.rank == SPECS[c].budget and f.B.abs().sum() == 0 for f in t.factors.values())
            assert set(t.base_delta) == (set(SHAPES) if rnd > 1 else set())
        ups = train(tasks, seed=rnd)
        seen.clear()
        s.aggregate(rnd, ups)
        for name, svd in zip(SHAPES, seen):
            new = round_sum(tasks, ups, name)
            ref[name] += new
            torch.testing.assert_close(global_dense(s, name), ref[name], rtol=1e-9, atol=1e-9)
            dense = torch.linalg.svdvals(new)
            q = svd.S.numel()
            torch.testing.assert_close(svd.S, dense[:q], rtol=1e-9, atol=1e-12)
            assert (dense[q:] < 1e-12).all()  # nothing beyond the stacked rank
            assert s.delta[name].rank <= min(SHAPES[name])


@pytest.mark.parametrize("tau", [0.6, 0.9])
def test_florist_below_full_energy_keeps_the_energy_rules_rank_and_the_best_approximation(tau):
    s = build("florist", FLoRISTSettings(energy=tau))
    before = {n: torch.zeros(SHAPES[n], dtype=torch.float64) for n in SHAPES}
    for rnd, cids in enumerate(ROUNDS[:2], 1):
        tasks = s.configure(rnd, [SPECS[c] for c in cids])
        ups = train(tasks, seed=rnd)
        metrics = s.aggregate(rnd, ups)
        ranks = []
        for name in SHAPES:
            target = round_sum(tasks, ups, name)
            U, S, Vh = torch.linalg.svd(target, full_matrices=False)
            k = energy_rule(S, tau)
            ranks.append(k)
            merged = global_dense(s, name) - before[name]
            best = (U[:, :k] * S[:k]) @ Vh[:k]
            torch.testing.assert_close(merged, best, rtol=1e-9, atol=1e-9)
            lost = ((merged - target).norm() / target.norm()) ** 2
            assert lost <= 1 - tau + 1e-12 and k < min(SHAPES[name])  # something was cut
            before[name] = global_dense(s, name)
        assert metrics["kept_rank"] == sum(ranks) / len(ranks)


def test_florist_zero_update_merges_nothing_and_energy_is_validated():
    s = build("florist")
    tasks = s.configure(1, SPECS)
    # clients that return their fresh LoRA untouched (B = 0): all σ = 0, no NaN, nothing merged
    s.aggregate(1, {c: ClientUpdate(factors=t.factors, num_examples=1) for c, t in tasks.items()})
    assert s.delta == {}
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="strategy.florist.energy"):
            build("florist", FLoRISTSettings(energy=bad))
