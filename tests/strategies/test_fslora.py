"""FSLoRA: the sketch is applied (only sampled columns/rows move), full budgets equal FedAvg,
sub-block training is gradient descent on W0 + s B S A, aggregation equals a float64 reference."""

import pytest
import torch

from fedlora import state as S
from fedlora.client import local_train
from fedlora.config import TrainConfig
from fedlora.lora import LoRAModel
from fedlora.server_opt import ServerOptimizer
from fedlora.sketch import sketch_indices
from fedlora.strategies.fslora import FSLoRA
from fedlora.types import ClientSpec, ClientUpdate, Factors

from ..conftest import TinyRegressor

SHAPES = {"up": (5, 6), "down": (4, 5)}


def make_model(seed=0):
    torch.manual_seed(seed)
    return LoRAModel(TinyRegressor(), ["up", "down"])


def nonzero_B(strategy, seed=0):
    """Give the global B random values so that both factors get gradients."""
    g = torch.Generator().manual_seed(seed)
    for f in strategy.factors.values():
        f.B.copy_(torch.randn(f.B.shape, generator=g) * 0.1)


def test_sketch_indices_are_seeded_per_round_and_client():
    a = sketch_indices(0, 1, 3, 64, 16)
    assert torch.equal(a, sketch_indices(0, 1, 3, 64, 16))
    assert len(set(a.tolist())) == 16 and a.max() < 64
    assert not torch.equal(a, sketch_indices(0, 2, 3, 64, 16))
    assert not torch.equal(a, sketch_indices(0, 1, 4, 64, 16))
    with pytest.raises(ValueError):
        sketch_indices(0, 1, 1, 8, 9)


def test_sketch_draw_is_uniform_over_coordinates():
    counts = torch.zeros(16)
    for rnd in range(2000):
        counts[sketch_indices(0, rnd, 0, 16, 4)] += 1
    freq = counts / 2000  # each coordinate is sampled with probability k/r = 0.25
    assert (freq - 0.25).abs().max() < 0.04


def test_only_sampled_columns_and_rows_move_by_the_returned_increments(regressor_batches):
    lm = make_model()
    strat = FSLoRA(lm.shapes(), global_rank=8, alpha=8.0, seed=0)
    nonzero_B(strat)
    before = S.clone(strat.factors)
    tasks = strat.configure(1, [ClientSpec(cid=7, budget=3, num_examples=10)])
    task = tasks[7]
    idx = strat._sent[7]
    assert task.factors["up"].rank == 3 and task.scale == pytest.approx(1.0 * 8 / 3)
    update = local_train(lm, task, regressor_batches, TrainConfig(local_steps=3, lr=0.05), 10)
    strat.aggregate(1, {7: update})
    rest = torch.tensor([j for j in range(8) if j not in idx.tolist()])
    for name, f in strat.factors.items():
        # untouched coordinates are bit-identical
        assert torch.equal(f.A[rest], before[name].A[rest])
        assert torch.equal(f.B[:, rest], before[name].B[:, rest])
        # sampled ones moved by exactly the client's increments (one client: weight 1)
        inc = S.subtract(update.factors, task.factors)[name]
        torch.testing.assert_close(f.A[idx] - before[name].A[idx], inc.A, rtol=0, atol=1e-6)
        torch.testing.assert_close(f.B[:, idx] - before[name].B[:, idx], inc.B, rtol=0, atol=1e-6)
        assert inc.A.abs().sum() > 0 and inc.B.abs().sum() > 0  # it really trained


def test_full_budgets_equal_fedavg_on_factors(regressor_batches):
    lm = make_model()
    strat = FSLoRA(lm.shapes(), global_rank=4, alpha=8.0, seed=0)
    nonzero_B(strat)
    start = S.clone(strat.factors)
    specs = [ClientSpec(cid=c, budget=4, num_examples=n) for c, n in [(0, 10), (1, 30), (2, 60)]]
    tasks = strat.configure(1, specs)
    updates = {}
    for c, task in tasks.items():
        assert task.scale == pytest.approx(2.0)  # k = r: the plain scale alpha / r
        for n in start:  # every client gets the whole global pair, in order
            assert torch.equal(task.factors[n].A, start[n].A)
        updates[c] = local_train(lm, task, regressor_batches[c:c + 1],
                                 TrainConfig(local_steps=1, lr=0.05), specs[c].num_examples)
    strat.aggregate(1, updates)
    fedavg = S.weighted_sum([updates[c].factors for c in range(3)], [0.1, 0.3, 0.6])
    for n in start:
        torch.testing.assert_close(strat.factors[n].A, fedavg[n].A, rtol=0, atol=1e-6)
        torch.testing.assert_close(strat.factors[n].B, fedavg[n].B, rtol=0, atol=1e-6)


def test_subblock_sgd_step_equals_gradient_descent_with_diagonal_sketch():
    torch.manual_seed(0)
    m, n, r, k, alpha, lr = 5, 6, 8, 3, 8.0, 0.1
    W0 = torch.randn(m, n, dtype=torch.float64)
    A = torch.randn(r, n, dtype=torch.float64)
    B = torch.randn(m, r, dtype=torch.float64)
    x, y = torch.randn(10, n, dtype=torch.float64), torch.randn(10, m, dtype=torch.float64)
    s = alpha / r
    idx = sketch_indices(0, 1, 0, r, k)

    # (1) the full-rank view: one SGD step on l(W0 + s B S A), S = (r/k) 1_I
    Sdiag = torch.zeros(r, dtype=torch.float64)
    Sdiag[idx] = r / k
    A1, B1 = A.clone().requires_grad_(), B.clone().requires_grad_()
    loss = ((x @ (W0 + s * B1 @ torch.diag(Sdiag) @ A1).T - y) ** 2).mean()
    loss.backward()
    A_ref, B_ref = A - lr * A1.grad, B - lr * B1.grad

    # (2) the client's view: train the sub-block with scale s r / k through LoRALinear
    layer = torch.nn.Linear(n, m, bias=False).double()
    layer.weight.data.copy_(W0)
    lm = LoRAModel(torch.nn.Sequential(layer), ["0"])
    task_state = S.take({"0": Factors(A=A, B=B)}, idx)
    lm.layers["0"].set_factors(task_state["0"], s * r / k)
    out = lm.model(x)
    ((out - y) ** 2).mean().backward()
    with torch.no_grad():
        A_blk = lm.layers["0"].lora_A - lr * lm.layers["0"].lora_A.grad
        B_blk = lm.layers["0"].lora_B - lr * lm.layers["0"].lora_B.grad
    A_new, B_new = A.clone(), B.clone()
    A_new[idx], B_new[:, idx] = A_blk, B_blk
    torch.testing.assert_close(A_new, A_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(B_new, B_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregation_matches_float64_reference_with_partial_participation(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (int(torch.randint(2, 9, (1,), generator=g)), 5), "v": (3, 7)}
    r = 10
    strat = FSLoRA(shapes, global_rank=r, alpha=4.0, seed=seed)
    strat.factors = {k: Factors(A=f.A.double(), B=torch.randn(f.B.shape, generator=g, dtype=torch.float64))
                     for k, f in strat.factors.items()}
    before = S.clone(strat.factors)
    population = [ClientSpec(cid=c, budget=b, num_examples=n)
                  for c, b, n in [(0, 2, 5), (1, 5, 17), (2, 10, 3), (3, 7, 40), (4, 3, 9)]]
    sampled = [population[i] for i in (0, 2, 3, 4)]  # client 1 sits this round out
    tasks = strat.configure(3, sampled)
    updates = {}
    for spec in sampled:
        t = tasks[spec.cid]
        trained = {k: Factors(A=f.A + torch.randn(f.A.shape, generator=g, dtype=torch.float64),
                              B=f.B + torch.randn(f.B.shape, generator=g, dtype=torch.float64))
                   for k, f in t.factors.items()}
        updates[spec.cid] = ClientUpdate(factors=trained, num_examples=spec.num_examples)
    strat.aggregate(3, updates)

    total = sum(s.num_examples for s in sampled)
    for name in shapes:
        refA = before[name].A.clone()
        refB = before[name].B.clone()
        for spec in sampled:  # naive: coordinate by coordinate
            p = spec.num_examples / total
            for pos, j in enumerate(strat._sent[spec.cid].tolist()):
                refA[j] += p * (updates[spec.cid].factors[name].A[pos] - tasks[spec.cid].factors[name].A[pos])
                refB[:, j] += p * (updates[spec.cid].factors[name].B[:, pos] - tasks[spec.cid].factors[name].B[:, pos])
        torch.testing.assert_close(strat.factors[name].A, refA, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(strat.factors[name].B, refB, rtol=1e-12, atol=1e-12)


def test_adam_server_optimizer_moves_only_covered_coordinates_and_resumes():
    shapes = {"m": (3, 4)}
    strat = FSLoRA(shapes, global_rank=4, alpha=4.0, seed=0,
                   server_optimizer=ServerOptimizer("adam", lr=0.01))
    tasks = strat.configure(1, [ClientSpec(0, 2, 5)])
    upd = {k: Factors(A=f.A + 1.0, B=f.B + 1.0) for k, f in tasks[0].factors.items()}
    before = S.clone(strat.factors)
    strat.aggregate(1, {0: ClientUpdate(upd, 5)})
    moved = (strat.factors["m"].A - before["m"].A).abs().sum(1) > 0
    assert moved.sum() == 2 and moved[strat._sent[0]].all()
    # first Adam step moves each touched coordinate by lr (bias-corrected sign step)
    torch.testing.assert_close((strat.factors["m"].A - before["m"].A)[strat._sent[0]],
                               torch.full((2, 4), 0.01), rtol=1e-4, atol=1e-6)
    clone = FSLoRA(shapes, global_rank=4, alpha=4.0, seed=0,
                   server_optimizer=ServerOptimizer("adam", lr=0.01))
    clone.load_state_dict(strat.state_dict())
    assert clone.optimizer.step_count == 1 and torch.equal(clone.factors["m"].A, strat.factors["m"].A)


def test_adamw_server_optimizer_matches_torch_adamw_on_the_pseudo_gradient():
    g = torch.Generator().manual_seed(0)
    params = {"m": Factors(A=torch.randn(3, 5, generator=g, dtype=torch.float64),
                           B=torch.randn(4, 3, generator=g, dtype=torch.float64))}
    ref = [torch.nn.Parameter(params["m"].A.clone()), torch.nn.Parameter(params["m"].B.clone())]
    ours = ServerOptimizer("adamw", lr=0.05)
    torch_opt = torch.optim.AdamW(ref, lr=0.05)  # its defaults: betas (0.9, 0.999), eps 1e-8, decay 0.01
    assert (ours.betas, ours.eps, ours.weight_decay) == ((0.9, 0.999), 1e-8, 0.01)
    for _ in range(6):
        delta = {"m": Factors(A=torch.randn(3, 5, generator=g, dtype=torch.float64),
                              B=torch.randn(4, 3, generator=g, dtype=torch.float64))}
        ours.step_(params, delta)
        ref[0].grad, ref[1].grad = -delta["m"].A, -delta["m"].B  # the pseudo-gradient
        torch_opt.step()
    torch.testing.assert_close(params["m"].A, ref[0].detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(params["m"].B, ref[1].detach(), rtol=0, atol=1e-6)
    assert ServerOptimizer("adam").betas == (0.9, 0.99) and ServerOptimizer("adam").weight_decay == 0
