"""FFA-LoRA: A frozen and never uploaded, B averaged exactly."""

import torch

from fedlora.strategies.ffa import FFASettings
from fedlora.types import payload_nbytes

from .common import SHAPES, SPECS, build, naive_dense, no_op_change, padded_increment_rounds, train, weights


def test_ffa_never_changes_A_and_is_exact():
    s = build("ffa")
    A0 = {n: f.A.clone() for n, f in s.factors.items()}
    for rnd in (1, 2):
        tasks = s.configure(rnd, SPECS)
        assert all(t.freeze_A for t in tasks.values())
        ups = train(tasks, seed=rnd)
        s.aggregate(rnd, ups)
        p = weights(range(4))
        for n in SHAPES:
            assert torch.equal(s.factors[n].A, A0[n])
            ref = sum(p[c] * naive_dense(ups[c].factors[n], s.scale) for c in range(4))
            got = s.scale * s.factors[n].B.double() @ s.factors[n].A.double()
            # A is shared, so the mean of products is exactly the product of the means
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_ffa_upload_bytes_are_B_only():
    s = build("ffa")
    tasks = s.configure(1, SPECS)
    for c, u in train(tasks).items():
        expected = sum(f.B.numel() * f.B.element_size() for f in u.factors.values())
        assert payload_nbytes(u) == expected
        assert payload_nbytes(tasks[c]) == sum(
            (f.A.numel() + f.B.numel()) * f.A.element_size() for f in tasks[c].factors.values())


def test_ffa_increment_form_adds_the_mean_padded_B_increment_and_keeps_A():
    s = build("ffa", FFASettings(aggregate="increments"))
    A0 = {n: f.A.clone() for n, f in s.factors.items()}
    for ref in padded_increment_rounds(s):
        for n in SHAPES:
            assert torch.equal(s.factors[n].A, A0[n])
            torch.testing.assert_close(s.factors[n].B, ref[n].B, rtol=0, atol=1e-12)


def test_ffa_no_op_round_is_a_no_op_only_in_increment_form():
    inc = no_op_change(build("ffa", FFASettings(aggregate="increments")))
    fac = no_op_change(build("ffa"))
    assert all(v == 0 for v in inc.values()), inc
    assert all(v > 0.1 for v in fac.values()), fac
