import pytest
import torch

from fedlora import state as S
from fedlora.types import Factors


def rand_state(rank, shapes, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {n: Factors(A=torch.randn(rank, i, generator=g, dtype=dtype),
                       B=torch.randn(o, rank, generator=g, dtype=dtype)) for n, (o, i) in shapes.items()}


SHAPES = {"a": (5, 7), "b.c": (3, 4)}


def test_take_then_scatter_places_block_and_zeros_elsewhere():
    st = rand_state(6, SHAPES, 0)
    idx = torch.tensor([1, 4])
    back = S.scatter(S.take(st, idx), idx, 6)
    for n, f in st.items():
        assert torch.equal(back[n].A[idx], f.A[idx]) and torch.equal(back[n].B[:, idx], f.B[:, idx])
        rest = torch.tensor([0, 2, 3, 5])
        assert back[n].A[rest].abs().sum() == 0 and back[n].B[:, rest].abs().sum() == 0


def test_take_copies_so_training_the_block_never_touches_the_source():
    st = rand_state(4, SHAPES, 0)
    block = S.take(st, torch.tensor([0, 2]))
    block["a"].A.add_(1.0)
    assert not torch.equal(st["a"].A[0], block["a"].A[0])


def test_scatter_add_equals_weighted_sum_of_scattered_blocks():
    target = rand_state(6, SHAPES, 2)
    blocks = [(S.take(rand_state(6, SHAPES, 3 + s), idx), idx, w)
              for s, (idx, w) in enumerate([(torch.tensor([1, 4]), 0.3), (torch.tensor([0, 1, 5]), 0.7)])]
    ref = S.weighted_sum([target] + [S.scatter(b, idx, 6) for b, idx, _ in blocks], [1.0] + [w for *_, w in blocks])
    for b, idx, w in blocks:
        S.scatter_add_(target, b, idx, w)
    for n in SHAPES:
        assert torch.equal(target[n].A, ref[n].A) and torch.equal(target[n].B, ref[n].B)


def test_pad_and_truncate_round_trip():
    st = rand_state(3, SHAPES, 1)
    padded = S.pad_rank(st, 7)
    assert padded["a"].rank == 7
    back = S.truncate_rank(padded, 3)
    for n in st:
        assert torch.equal(back[n].A, st[n].A) and torch.equal(back[n].B, st[n].B)
        assert torch.equal(S.dense(padded[n]), S.dense(st[n]))


def test_weighted_sum_matches_naive_float64_loop():
    states = [rand_state(3, SHAPES, s) for s in range(4)]
    weights = [0.1, 0.2, 0.3, 0.4]
    got = S.weighted_sum(states, weights)
    for n, (o, i) in SHAPES.items():
        for r in range(3):
            for c in range(i):
                ref = sum(w * st[n].A[r, c].item() for st, w in zip(states, weights))
                assert got[n].A[r, c].item() == pytest.approx(ref, abs=1e-12)
            for c in range(o):
                ref = sum(w * st[n].B[c, r].item() for st, w in zip(states, weights))
                assert got[n].B[c, r].item() == pytest.approx(ref, abs=1e-12)


def test_example_weights_and_errors():
    assert S.example_weights([1, 3]) == [0.25, 0.75]
    with pytest.raises(ValueError):
        S.example_weights([0, 0])
    with pytest.raises(ValueError, match="module sets differ"):
        S.subtract(rand_state(2, SHAPES, 0), rand_state(2, {"a": (5, 7)}, 0))


def test_factors_reject_mismatched_ranks():
    with pytest.raises(ValueError, match="same r"):
        Factors(A=torch.zeros(3, 4), B=torch.zeros(5, 2))


def test_init_factors_is_lora_init_and_seeded():
    a = S.init_factors({"m": (10, 20)}, 4, torch.Generator().manual_seed(3))
    b = S.init_factors({"m": (10, 20)}, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a["m"].A, b["m"].A)
    assert a["m"].B.abs().sum() == 0  # B = 0: the update starts at zero
    assert a["m"].A.abs().max() <= 1 / 20**0.5
