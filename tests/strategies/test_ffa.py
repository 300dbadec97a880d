"""FFA-LoRA: A frozen and never uploaded, B averaged exactly."""

import torch

from fedlora.types import payload_nbytes

from .common import SHAPES, SPECS, build, naive_dense, train, weights


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
