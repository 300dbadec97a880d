"""What every registered method must do: honest byte counts, state round trips, any dtype."""

import pytest
import torch
from safetensors.torch import save

from fedlora.strategies import METHODS
from fedlora.types import Factors, payload_nbytes, tensors_of

from .common import SHAPES, SPECS, build, global_dense, train


def test_registry_has_every_method():
    assert set(METHODS) == {"fslora", "flexlora", "hetlora", "flora", "fedit", "ffa", "fullrank",
                            "florist", "raflora", "plora", "fedex", "fslora-u"}


def plain(x):
    """Only tensors, JSON scalars, lists and dicts (what a checkpoint takes)."""
    if isinstance(x, dict):
        return all(isinstance(k, str) and plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(plain(v) for v in x)
    return x is None or isinstance(x, (torch.Tensor, int, float, str))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_dict_holds_only_plain_types(name):
    s = build(name)
    s.aggregate(1, train(s.configure(1, SPECS)))
    assert plain(s.state_dict())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_reported_bytes_equal_the_serialised_tensors(name):
    s = build(name)
    tasks = s.configure(1, SPECS)
    ups = train(tasks)
    for payload in [*tasks.values(), *ups.values()]:
        tensors = {k: v.contiguous() for k, v in tensors_of(payload).items()}
        blob = save(tensors)
        header = int.from_bytes(blob[:8], "little")
        assert payload_nbytes(payload) == len(blob) - 8 - header
    if name == "ffa":
        assert not any(k.endswith(".A") for k in tensors_of(ups[0]))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_dict_round_trip(name):
    s = build(name)
    tasks = s.configure(1, SPECS)
    s.aggregate(1, train(tasks))
    t = build(name)
    t.load_state_dict(s.state_dict())
    for n in SHAPES:
        torch.testing.assert_close(global_dense(t, n), global_dense(s, n))


@pytest.mark.parametrize("name", ["flexlora", "flora", "florist", "raflora", "plora"])
def test_rank_scaled_aggregation_needs_no_memory_of_the_tasks(name):
    """s_i comes from the uploaded rank: a server restored between configure and aggregate
    (or one that never configured this round) aggregates exactly like the original."""
    s = build(name)
    s.aggregate(1, train(s.configure(1, SPECS[:3])))
    ups = train(s.configure(2, SPECS[1:]), seed=2)
    t = build(name)
    t.load_state_dict(s.state_dict())  # restored after round 2 was configured
    s.aggregate(2, ups)
    t.aggregate(2, ups)
    for n in SHAPES:
        torch.testing.assert_close(global_dense(t, n), global_dense(s, n), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_strategies_run_in_the_dtype_the_factors_come_in(name, dtype):
    s = build(name)
    for rnd in (1, 2, 3):
        tasks = s.configure(rnd, SPECS[rnd % 2:])
        ups = train(tasks, seed=rnd)
        for u in ups.values():
            u.factors = {n: Factors(A=f.A.to(dtype), B=f.B.to(dtype)) for n, f in u.factors.items()}
        s.aggregate(rnd, ups)
    for n in SHAPES:
        assert torch.isfinite(global_dense(s, n)).all() and global_dense(s, n).abs().sum() > 0
