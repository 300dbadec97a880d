"""HetLoRA: zero-padded averages, loaded back into the clients."""

import torch

from fedlora import state as S
from fedlora.strategies.hetlora import HetLoRASettings

from .common import BUDGETS, SHAPES, SPECS, build, no_op_change, padded_increment_rounds, train, weights


def test_hetlora_pads_averages_and_loads_the_aggregate_back():
    s = build("hetlora")
    assert s.rank == max(BUDGETS)
    tasks = s.configure(1, SPECS[:3])
    for c in range(3):
        assert tasks[c].factors["q"].rank == BUDGETS[c]
    ups = train(tasks)
    s.aggregate(1, ups)
    p = weights([0, 1, 2])
    for n in SHAPES:
        refA = torch.zeros(s.rank, SHAPES[n][1], dtype=torch.float64)
        refB = torch.zeros(SHAPES[n][0], s.rank, dtype=torch.float64)
        for c in range(3):
            r = BUDGETS[c]
            refA[:r] += p[c] * ups[c].factors[n].A
            refB[:, :r] += p[c] * ups[c].factors[n].B
        torch.testing.assert_close(s.factors[n].A, refA)
        torch.testing.assert_close(s.factors[n].B, refB)
    nxt = s.configure(2, SPECS)
    for c in range(4):  # the aggregate (not the init) really reaches the clients next round
        for n in SHAPES:
            r = BUDGETS[c]
            torch.testing.assert_close(nxt[c].factors[n].A, s.factors[n].A[:r])
            torch.testing.assert_close(nxt[c].factors[n].B, s.factors[n].B[:, :r])
            assert nxt[c].factors[n].B.abs().sum() > 0  # B starts at 0: only the aggregate moves it


def test_hetlora_norm_weighting_prefers_larger_updates():
    s = build("hetlora", HetLoRASettings(norm_weighted=True))
    tasks = s.configure(1, SPECS[:3])
    ups = train(tasks)
    s.aggregate(1, ups)
    import math
    norms = {c: math.sqrt(sum(float(torch.linalg.norm(f.B @ f.A)) ** 2 for f in ups[c].factors.values()))
             for c in range(3)}
    raw = {c: weights([0, 1, 2])[c] * norms[c] for c in range(3)}
    w = {c: raw[c] / sum(raw.values()) for c in range(3)}
    ref = sum(w[c] * S.pad_rank(ups[c].factors, s.rank)["v"].B for c in range(3))
    torch.testing.assert_close(s.factors["v"].B, ref)


def test_hetlora_increment_form_adds_the_mean_padded_increment():
    s = build("hetlora", HetLoRASettings(aggregate="increments"))
    for ref in padded_increment_rounds(s):
        for n in SHAPES:
            torch.testing.assert_close(s.factors[n].A, ref[n].A, rtol=0, atol=1e-12)
            torch.testing.assert_close(s.factors[n].B, ref[n].B, rtol=0, atol=1e-12)


def test_hetlora_no_op_round_is_a_no_op_only_in_increment_form():
    inc = no_op_change(build("hetlora", HetLoRASettings(aggregate="increments")))
    fac = no_op_change(build("hetlora"))
    assert all(v == 0 for v in inc.values()), inc
    assert all(v > 0.1 for v in fac.values()), fac  # the padded mean shrinks the high slots
