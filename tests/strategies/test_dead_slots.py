"""No dead slots: after a rank-deficient round, FlexLoRA and raFLoRA (balanced split) pad the
zero singular values like a rank excess, so every slot of every client trains; a budget
raFLoRA cannot serve is refused in one line before any round."""

from types import SimpleNamespace

import pytest
import torch

from fedlora.errors import ConfigError
from fedlora.lowrank import numerical_rank
from fedlora.methods import get_method
from fedlora.strategies import build_strategy
from fedlora.types import ClientSpec, ClientUpdate, Factors

SHAPES = {"q": (9, 7)}


def rank_one_round(name, budget=5):
    """Round 1 with one client of ``budget`` returning B with a single non-zero column; the
    round-2 task (a rank-deficient aggregate: one direction, ``budget - 1`` zero σ)."""
    s = build_strategy(name, SHAPES, [budget], seed=0, global_rank=budget, alpha=4.0)
    spec = ClientSpec(cid=0, budget=budget, num_examples=10)
    task = s.configure(1, [spec])[0]
    g = torch.Generator().manual_seed(1)
    A = torch.randn(budget, 7, generator=g)
    B = torch.zeros(9, budget)
    B[:, 0] = torch.randn(9, generator=g)
    s.aggregate(1, {0: ClientUpdate(factors={"q": Factors(A=A, B=B)}, num_examples=10)})
    return s, task, s.configure(2, [spec])[0]


@pytest.mark.parametrize("name", ["flexlora", "raflora"])
def test_after_a_rank_deficient_round_every_slot_gets_a_gradient(name):
    s, _, task = rank_one_round(name)
    f = task.factors["q"]
    norms = f.A.norm(dim=1)
    assert (norms > 0.1).all(), norms  # was [1.4, 0, 0, 0, 0] (sqrt of round-off σ)
    torch.testing.assert_close(task.scale * f.B @ f.A, s.global_task().scale * s.global_task().factors["q"].B
                               @ s.global_task().factors["q"].A, rtol=1e-5, atol=1e-6)  # padding adds nothing
    # a backward through the client's model W0 + s B A: every slot's gradient is non-zero
    g = torch.Generator().manual_seed(2)
    W0, x, y = torch.randn(9, 7, generator=g), torch.randn(16, 7, generator=g), torch.randn(16, 9, generator=g)
    A, B = f.A.clone().requires_grad_(), f.B.clone().requires_grad_()
    ((x @ (W0 + task.scale * B @ A).T - y) ** 2).mean().backward()
    per_slot = A.grad.norm(dim=1) + B.grad.norm(dim=0)
    assert (per_slot > 1e-3 * per_slot.max()).all(), per_slot


def test_numerical_rank_counts_singular_values_above_round_off_of_the_largest():
    S = torch.tensor([2.0, 1.0, 1e-9, 0.0])  # tolerance 2 · 10 · eps: 4.4e-15 (float64), 2.4e-6 (float32)
    assert numerical_rank(S.double(), 10) == 3 and numerical_rank(S, 10) == 2
    assert numerical_rank(torch.zeros(3), 4) == 0 and numerical_rank(torch.zeros(0), 4) == 0


def test_raflora_budget_below_its_smallest_level_is_one_line_naming_it():
    blocker = get_method("raflora").budget_blocker
    assert blocker([4, 8, 8], [4, 8, 8]) is None
    reason = blocker([4, 8], [8, 2, 4])
    assert reason is not None and "\n" not in reason and "[2]" in reason and "smallest rank level 4" in reason
    assert all(m.budget_blocker([4], [2]) is None for m in map(get_method, ["fslora", "flexlora", "fedit"]))


def test_flower_server_refuses_an_unservable_registered_budget_before_building():
    pytest.importorskip("flwr")
    from fedlora.flower.server_app import use_budgets

    exp = SimpleNamespace(cfg=SimpleNamespace(strategy=SimpleNamespace(name="raflora")))
    with pytest.raises(ConfigError, match=r"^budgets: raflora cannot serve budgets \[2\]"):
        use_budgets(exp, [4, 8], SimpleNamespace(budgets=[8, 2], num_examples=[5, 5]))
