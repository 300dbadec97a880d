"""FedIT and the full-rank reference: FedAvg on the factors."""

import pytest
import torch

from fedlora import state as S
from fedlora.types import ClientUpdate

from .common import BUDGETS, EXAMPLES, SHAPES, SPECS, build, train, weights


@pytest.mark.parametrize("name", ["fedit", "fullrank"])
def test_factor_averaging_matches_loop_and_identical_clients_are_identity(name):
    s = build(name)
    rank = min(BUDGETS) if name == "fedit" else 6
    tasks = s.configure(1, SPECS[:3])
    assert all(t.factors["q"].rank == rank for t in tasks.values())
    ups = train(tasks)
    s.aggregate(1, ups)
    p = weights([0, 1, 2])
    for n in SHAPES:
        torch.testing.assert_close(s.factors[n].A, sum(p[c] * ups[c].factors[n].A for c in range(3)))
        torch.testing.assert_close(s.factors[n].B, sum(p[c] * ups[c].factors[n].B for c in range(3)))
    # identical clients (here: nobody trained) leave the global pair exactly as it was
    before = S.clone(s.factors)
    tasks = s.configure(2, SPECS[:3])
    s.aggregate(2, {c: ClientUpdate(S.clone(t.factors), EXAMPLES[c]) for c, t in tasks.items()})
    for n in SHAPES:
        torch.testing.assert_close(s.factors[n].A, before[n].A, rtol=1e-12, atol=0)
        torch.testing.assert_close(s.factors[n].B, before[n].B, rtol=1e-12, atol=0)
