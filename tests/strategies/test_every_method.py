"""What every registered method must do: honest byte counts, state round trips, any dtype."""

import pytest
import torch
from safetensors.torch import save

from fedlora.strategies import METHODS
from fedlora.types import ClientUpdate, Factors, payload_nbytes, tensors_of

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


def cast(updates, dtype):
    return {c: ClientUpdate(factors={n: Factors(A=f.A.to(dtype), B=f.B.to(dtype)) for n, f in u.factors.items()},
                            num_examples=u.num_examples, freeze_A=u.freeze_A) for c, u in updates.items()}


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_strategies_run_in_the_dtype_the_factors_come_in(name, dtype, tol):
    """Uploads in ``dtype`` give the global model that the same (rounded) values give in float64,
    to ``dtype``'s precision, and a global state in ``dtype`` or float32, never below it."""
    s, ref = build(name), build(name)
    for rnd in (1, 2, 3):
        tasks = s.configure(rnd, SPECS[rnd % 2:])
        ref.configure(rnd, SPECS[rnd % 2:])
        ups = cast(train(tasks, seed=rnd), dtype)
        s.aggregate(rnd, ups)
        ref.aggregate(rnd, cast(ups, torch.float64))  # the rounded values, exactly
    for n, f in s.global_task().factors.items():
        assert f.A.dtype in {dtype, torch.float32} and f.B.dtype in {dtype, torch.float32}, (n, f.A.dtype)
        want = global_dense(ref, n)
        assert want.abs().sum() > 0 and float((global_dense(s, n) - want).norm() / want.norm()) < tol
