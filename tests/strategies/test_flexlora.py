"""FlexLoRA: the SVD of the averaged product, each client's rank, one decomposition per layer."""

import torch

from fedlora.strategies.flexlora import FlexLoRASettings
from fedlora.types import ClientSpec

from .common import SHAPES, SPECS, build, global_dense, naive_dense, train, weights


def test_flexlora_global_update_is_the_weighted_sum_of_products_and_clients_get_their_rank():
    s = build("flexlora")
    tasks = s.configure(1, SPECS[:3])
    ups = train(tasks)
    s.aggregate(1, ups)
    p = weights([0, 1, 2])
    for name in SHAPES:
        ref = torch.zeros(SHAPES[name], dtype=torch.float64)
        for c in (0, 1, 2):  # naive loop: each client's own scale folded in
            ref += p[c] * naive_dense(ups[c].factors[name], tasks[c].scale)
        torch.testing.assert_close(global_dense(s, name), ref, rtol=1e-9, atol=1e-9)
    # next round: every client receives factors of its own rank, the best rank-r_i fit
    nxt = s.configure(2, SPECS)
    for c, spec in enumerate(SPECS):
        for name in SHAPES:
            f = nxt[c].factors[name]
            assert f.rank == spec.budget and f.shape == SHAPES[name]
            U, Sv, Vh = torch.linalg.svd(global_dense(s, name))
            best = (U[:, :spec.budget] * Sv[:spec.budget]) @ Vh[:spec.budget]
            torch.testing.assert_close(nxt[c].scale * f.B.double() @ f.A.double(), best, rtol=0, atol=1e-8)


def test_flexlora_exact_when_rank_covers_the_update_and_splits_agree():
    out = {}
    for split in ("balanced", "all-in-B"):
        s = build("flexlora", FlexLoRASettings(sigma_split=split))
        tasks = s.configure(1, SPECS[:2])  # ranks 2 and 5: rank(ΔW) <= 7 = min dims
        s.aggregate(1, train(tasks))
        big = s.configure(2, [ClientSpec(9, 7, 1)])[9]  # r_i = 7 >= rank(ΔW)
        out[split] = {n: big.scale * f.B @ f.A for n, f in big.factors.items()}
        for n in SHAPES:
            torch.testing.assert_close(out[split][n].double(), global_dense(s, n), rtol=0, atol=1e-8)
    for n in SHAPES:
        torch.testing.assert_close(out["balanced"][n], out["all-in-B"][n], rtol=0, atol=1e-8)


def test_flexlora_decomposes_once_per_layer_and_truncates_once_per_distinct_rank(monkeypatch):
    import fedlora.lowrank as L
    import fedlora.strategies.flexlora as F

    calls = {"svd": 0, "truncate": 0}
    real_svd, real_truncate = F.svd_of_product, L.SVD.truncate

    def counting_svd(B, A):
        calls["svd"] += 1
        return real_svd(B, A)

    def counting_truncate(self, *a, **k):
        calls["truncate"] += 1
        return real_truncate(self, *a, **k)

    monkeypatch.setattr(F, "svd_of_product", counting_svd)
    monkeypatch.setattr(L.SVD, "truncate", counting_truncate)
    s = build("flexlora")
    s.aggregate(1, train(s.configure(1, SPECS)))
    assert calls["svd"] == len(SHAPES)  # one per layer, not per client
    many = [ClientSpec(cid=10 + i, budget=[2, 5][i % 2], num_examples=1) for i in range(8)]
    tasks = s.configure(2, many)
    assert calls["truncate"] == 2 * len(SHAPES)  # two distinct ranks, eight clients
    assert all(t.factors["q"].rank == spec.budget for t, spec in zip(tasks.values(), many))


def test_flexlora_client_above_the_aggregate_rank_trains_every_slot_from_an_unchanged_product():
    """A rank-3 client after a round whose ΔW has rank 1: its two extra slots are a zero B
    column over an A row orthogonal to the kept one (zero pairs would get no gradient)."""
    from fedlora.lora import LoRAModel
    from fedlora.strategies import build_strategy

    from ..conftest import TinyRegressor

    torch.manual_seed(0)
    lm = LoRAModel(TinyRegressor().double(), targets=["up", "down"])
    s = build_strategy("flexlora", lm.shapes(), [1, 3], seed=0, global_rank=3, alpha=4.0)
    s.aggregate(1, train(s.configure(1, [ClientSpec(0, 1, 10)])))  # ΔW of rank 1
    task = s.configure(2, [ClientSpec(1, 3, 10)])[1]
    for name, f in task.factors.items():
        assert s.svd[name].S.numel() == 1 and f.rank == 3
        torch.testing.assert_close(task.scale * f.B @ f.A, global_dense(s, name), rtol=0, atol=1e-12)
        torch.testing.assert_close(f.A[1:] @ f.A[1:].T, torch.eye(2, dtype=torch.float64) / 3, rtol=0, atol=1e-12)
        torch.testing.assert_close(f.A[1:] @ f.A[:1].T, torch.zeros(2, 1, dtype=torch.float64), rtol=0, atol=1e-12)
    lm.load(task)
    g = torch.Generator().manual_seed(1)
    lm.model(torch.randn(8, 6, generator=g, dtype=torch.float64),
             torch.randn(8, 4, generator=g, dtype=torch.float64)).loss.backward()
    for name, layer in lm.layers.items():
        per_slot = layer.lora_A.grad.norm(dim=1) + layer.lora_B.grad.norm(dim=0)  # (r,)
        assert (per_slot > 1e-8).all(), (name, per_slot)
