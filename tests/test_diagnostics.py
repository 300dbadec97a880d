"""Fidelity and spectrum diagnostics: against dense float64 references, on every method."""

import math

import pytest
import torch

from fedlora.diagnostics import MAX_MODULES, effective_rank, energy_shares, round_diagnostics, sample_modules
from fedlora.server import FederatedServer
from fedlora.strategies import METHODS
from fedlora.types import ClientTask, ClientUpdate, Factors

from .strategies.common import BUDGETS, EXAMPLES, SHAPES, SPECS, build, global_dense, train

# Methods whose global adapter is by construction the weighted mean of the clients' adapters.
# A method named here must declare it (Method.exact) once it is registered, e.g. a future "fedex".
EXACT_BY_CONSTRUCTION = {"flora", "flexlora", "ffa", "fedex"}
DECLARED_EXACT = sorted(n for n, m in METHODS.items() if m.exact(m.default_settings()))


def rand_factors(r, shape, g, scale=1.0):
    m, n = shape
    return Factors(A=torch.randn(r, n, generator=g, dtype=torch.float64),
                   B=scale * torch.randn(m, r, generator=g, dtype=torch.float64))


def dense_adapter(task, factors, name):
    d = task.scale * factors.B.double() @ factors.A.double()
    if name in task.base_delta:
        d = d + task.base_delta[name].B.double() @ task.base_delta[name].A.double()
    return d


def dense_fidelity(tasks, updates, glob, modules):
    total = sum(updates[c].num_examples for c in updates)
    err = ref = 0.0
    for n in modules:
        mean = sum(updates[c].num_examples / total * dense_adapter(tasks[c], updates[c].factors[n], n) for c in updates)
        err += float((mean - dense_adapter(glob, glob.factors[n], n)).norm() ** 2)
        ref += float(mean.norm() ** 2)
    return math.sqrt(err / ref)


def two_rounds(name):
    s = build(name)
    s.aggregate(1, train(s.configure(1, SPECS[:3])))
    tasks = s.configure(2, SPECS[1:])  # FLoRA's tasks now carry a base delta
    ups = train(tasks, seed=2)
    s.aggregate(2, ups)
    return s, tasks, ups


def test_every_method_that_is_exact_by_construction_declares_it():
    assert {"flora", "flexlora"} <= set(DECLARED_EXACT)
    assert EXACT_BY_CONSTRUCTION & set(METHODS) <= set(DECLARED_EXACT)


@pytest.mark.parametrize("name", DECLARED_EXACT)
def test_fidelity_is_zero_for_methods_that_declare_exactness(name):
    s, tasks, ups = two_rounds(name)
    d = round_diagnostics(tasks, ups, s.global_task(), sorted(SHAPES))
    assert d["fidelity"] < 1e-6, d


@pytest.mark.parametrize("name", ["hetlora", "fslora", "fedit"])
def test_fidelity_equals_the_dense_reference(name):
    s, tasks, ups = two_rounds(name)
    glob = s.global_task()
    d = round_diagnostics(tasks, ups, glob, sorted(SHAPES))
    assert d["fidelity"] == pytest.approx(dense_fidelity(tasks, ups, glob, SHAPES), rel=1e-9, abs=1e-12)
    if name == "hetlora":  # ranks 2..5 padded to 5 and averaged as factors: inexact
        assert d["fidelity"] > 0.05


def test_fidelity_counts_unequal_base_deltas_and_the_global_delta():
    g = torch.Generator().manual_seed(3)
    shape = SHAPES["q"]
    shared = rand_factors(2, shape, g)
    tasks = {c: ClientTask(factors={"q": rand_factors(BUDGETS[c], shape, g)}, scale=0.5 + c,
                           base_delta={"q": shared if c < 2 else rand_factors(3, shape, g)}) for c in range(3)}
    ups = {c: ClientUpdate(factors={"q": rand_factors(BUDGETS[c], shape, g)}, num_examples=EXAMPLES[c])
           for c in range(3)}
    glob = ClientTask(factors={"q": rand_factors(4, shape, g)}, scale=0.3, base_delta={"q": rand_factors(2, shape, g)})
    got = round_diagnostics(tasks, ups, glob, ["q"])["fidelity"]
    assert got == pytest.approx(dense_fidelity(tasks, ups, glob, ["q"]), rel=1e-9)


def test_effective_rank_and_energy_shares():
    assert effective_rank(torch.tensor([3.0])) == pytest.approx(1.0)
    assert effective_rank(torch.tensor([2.0, 0.0, 0.0])) == pytest.approx(1.0)
    for k in (1, 5, 40):
        assert effective_rank(torch.full((k,), 0.7)) == pytest.approx(k)
    assert effective_rank(torch.zeros(3)) == 0.0
    S = torch.linspace(5, 0.1, 50)
    e = energy_shares(S)
    shares = [e[f"energy_top{k}"] for k in (4, 8, 16, 32)]
    assert all(a <= b <= 1 for a, b in zip(shares, shares[1:])) and 0 < shares[0] < 1
    assert energy_shares(torch.tensor([1.0, 1.0]))["energy_top4"] == pytest.approx(1.0)
    assert energy_shares(torch.linspace(3, 1, 8))["energy_top4"] == pytest.approx(
        float((torch.linspace(3, 1, 8)[:4] ** 2).sum() / (torch.linspace(3, 1, 8) ** 2).sum()))


def test_spectrum_of_the_global_adapter_from_its_factors():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(30, 3, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(20, 3, generator=g, dtype=torch.float64))[0]
    flat = ClientTask(factors={"m": Factors(A=V.T.clone(), B=2 * U)}, scale=1.5)  # three equal σ = 3
    one = ClientTask(factors={"m": Factors(A=V.T[:1].clone(), B=U[:, :1])}, scale=1.0,
                     base_delta={"m": Factors(A=V.T[:1].clone(), B=U[:, :1])})  # rank 1, delta included
    ups = {0: ClientUpdate(factors={"m": Factors(A=V.T[:1].clone(), B=U[:, :1])}, num_examples=1)}
    tasks = {0: ClientTask(factors=ups[0].factors, scale=1.0)}
    d_flat, d_one = (round_diagnostics(tasks, ups, glob, ["m"]) for glob in (flat, one))
    assert d_flat["effective_rank"] == pytest.approx(3.0) and d_flat["energy_top4"] == pytest.approx(1.0)
    assert d_one["effective_rank"] == pytest.approx(1.0) and d_one["energy_top4"] == pytest.approx(1.0)
    assert d_one["fidelity"] == pytest.approx(1.0)  # global 2·u vᵀ against the clients' u vᵀ


def test_module_sample_is_fixed_sorted_and_small():
    names = [f"layer.{i}.q" for i in range(30)]
    a, b = sample_modules(names, seed=4), sample_modules(list(reversed(names)), seed=4)
    assert a == b == sorted(a) and len(a) == MAX_MODULES and set(a) <= set(names)
    assert sample_modules(names[:5], seed=4) == sorted(names[:5])


def test_server_reports_the_diagnostics_every_round():
    server = FederatedServer(build("hetlora"), {}, budgets=BUDGETS, num_examples=EXAMPLES)
    for rnd in (1, 2):
        tasks = server.configure(rnd, [0, 1, 2, 3])
        ups = train(tasks, seed=rnd)
        for u in ups.values():  # the server screens out updates in another dtype than their task
            u.factors = {n: Factors(A=f.A.float(), B=f.B.float()) for n, f in u.factors.items()}
        metrics = server.aggregate(rnd, tasks, ups)
        assert {"fidelity", "effective_rank", "energy_top4", "energy_top8", "energy_top16",
                "energy_top32"} <= set(metrics)
    assert metrics["fidelity"] > 0 and torch.isfinite(global_dense(server.strategy, "q")).all()


def test_fidelity_past_min_dim_takes_the_dense_route_and_agrees():
    g = torch.Generator().manual_seed(5)
    shape = (6, 5)  # stacked rank 3 · 2 + 2 + 2 + 3 > min(m, n)
    tasks = {c: ClientTask(factors={"q": rand_factors(2, shape, g)}, scale=0.7) for c in range(3)}
    ups = {c: ClientUpdate(factors={"q": rand_factors(2, shape, g)}, num_examples=EXAMPLES[c]) for c in range(3)}
    glob = ClientTask(factors={"q": rand_factors(2, shape, g)}, scale=1.0, base_delta={"q": rand_factors(3, shape, g)})
    d = round_diagnostics(tasks, ups, glob, ["q"])
    assert d["fidelity"] == pytest.approx(dense_fidelity(tasks, ups, glob, ["q"]), rel=1e-9)
    S = torch.linalg.svdvals(dense_adapter(glob, glob.factors["q"], "q"))
    assert d["effective_rank"] == pytest.approx(effective_rank(S), rel=1e-9)
