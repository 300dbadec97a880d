"""Client-level DP: Poisson sampling, clipped increments, a fixed-denominator mean, Gaussian noise
from OS entropy (reproducible only on request), and an accountant that matches the sampling."""

import math

import pytest
import torch

from fedlora import privacy
from fedlora import state as S
from fedlora.config import ConfigError, PrivacyConfig, load_config
from fedlora.server import FederatedServer, sample_clients
from fedlora.strategies.fslora import FSLoRA
from fedlora.types import ClientUpdate, Factors

N, PER_ROUND = 4, 2  # q = 0.5, expected clients m = 2


def dp_server(noise=1.0, clip=0.5, reproducible=False, rank=16, budget=16, shape=(40, 50)):
    strat = FSLoRA({"m": shape}, global_rank=rank, alpha=16.0, seed=0)
    privacy = PrivacyConfig(noise_multiplier=noise, dp_clip=clip, reproducible_noise=reproducible)
    return FederatedServer(strat, {}, budgets=[budget] * N, num_examples=[5] * N, privacy=privacy, seed=3,
                           per_round=PER_ROUND)


def noop_round(server, rnd=1, cids=(0, 1, 2, 3)):
    """Clients send back exactly what they got: the whole change of the global pair is the noise."""
    before = S.clone(server.strategy.factors)
    tasks = server.configure(rnd, list(cids))
    metrics = server.aggregate(rnd, tasks, {c: ClientUpdate(S.clone(t.factors), 5) for c, t in tasks.items()})
    f = server.strategy.factors["m"]
    return torch.cat([(f.A - before["m"].A).flatten(), (f.B - before["m"].B).flatten()]), metrics


def test_noise_has_the_fixed_denominator_std_and_differs_between_runs_unless_asked():
    # 14,400 noise values: the sample std is within 3% of the true one at 5 standard errors, and the
    # reproducible stream makes the check deterministic (OS-entropy noise would fail it now and then)
    noise, metrics = noop_round(dp_server(reproducible=True, shape=(400, 500)))
    expected = 1.0 * 0.5 / PER_ROUND  # multiplier * clip / expected clients, whoever took part
    assert noise.std().item() == pytest.approx(expected, rel=0.03)
    assert abs(noise.mean().item()) < 4 * expected / math.sqrt(noise.numel())
    assert metrics["dp_epsilon"] > 0
    default, _ = noop_round(dp_server())
    again, _ = noop_round(dp_server())  # same seed, same config: other noise (OS entropy)
    assert not torch.equal(default, again)
    a, _ = noop_round(dp_server(reproducible=True))
    b, _ = noop_round(dp_server(reproducible=True))
    assert torch.equal(a, b)


def test_the_mean_uses_the_expected_number_of_clients_and_increments_are_clipped():
    server = dp_server(noise=1e-12, clip=1.0)  # noise negligible: the mechanism's mean is visible
    before = S.clone(server.strategy.factors)
    tasks = server.configure(1, [0, 1, 2])  # 3 clients took part, 2 were expected
    g = torch.Generator().manual_seed(0)
    ups, deltas = {}, []
    for c, t in tasks.items():
        d = {n: (torch.randn(f.A.shape, generator=g), torch.randn(f.B.shape, generator=g))
             for n, f in t.factors.items()}
        norm = math.sqrt(sum(float((a ** 2).sum() + (b ** 2).sum()) for a, b in d.values()))
        deltas.append({n: (a / norm, b / norm) for n, (a, b) in d.items()})  # clipped to norm 1
        ups[c] = ClientUpdate({n: Factors(A=f.A + d[n][0], B=f.B + d[n][1]) for n, f in t.factors.items()}, 5)
    server.aggregate(1, tasks, ups)
    for i, part in enumerate("AB"):
        ref = getattr(before["m"], part) + sum(d["m"][i] for d in deltas) / PER_ROUND
        torch.testing.assert_close(getattr(server.strategy.factors["m"], part), ref, rtol=0, atol=1e-6)


def test_clients_are_poisson_sampled_from_os_entropy(monkeypatch):
    rounds = range(1, 201)  # 16 possible samples a round: two equal 200-round draws have odds 16**-200
    server = dp_server()
    drawn = [server.sample(r) for r in rounds]
    sizes = [len(c) for c in drawn]
    assert min(sizes) == 0 and max(sizes) == N  # any number of clients can take part
    assert sum(sizes) / len(sizes) == pytest.approx(PER_ROUND, abs=0.3)
    # the seed cannot reproduce the sample: not another server of the same seed, not the seeded streams
    assert drawn != [dp_server().sample(r) for r in rounds]
    seeded = [dp_server(reproducible=True).sample(r) for r in rounds]
    assert drawn != seeded and seeded == [dp_server(reproducible=True).sample(r) for r in rounds]
    assert drawn != [sample_clients(N, PER_ROUND, 3, r) for r in rounds]
    # and it does come from os.urandom: fixing its bytes fixes the sample
    monkeypatch.setattr(privacy.os, "urandom", lambda n: bytes(range(n)))
    assert [dp_server().sample(r) for r in rounds] == [dp_server().sample(r) for r in rounds]


def test_reported_epsilon_is_opacus_rdp_for_the_poisson_sampled_gaussian_mechanism():
    opacus = pytest.importorskip("opacus")
    server = dp_server(noise=1.1)
    for rnd in range(1, 6):
        _, m = noop_round(server, rnd, cids=(0, 1))
    acc = opacus.accountants.RDPAccountant()
    for _ in range(5):
        acc.step(noise_multiplier=1.1, sample_rate=PER_ROUND / N)
    assert m["dp_epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    restored = dp_server(noise=1.1)
    restored.load_state_dict(server.state_dict())
    assert restored.dp.rounds == 5  # a resumed run keeps counting


def test_dp_with_a_server_optimizer_other_than_sgd_is_refused_at_load():
    with pytest.raises(ConfigError, match='server_optimizer = "sgd"'):
        load_config(None, ["privacy.noise_multiplier=1.0", "privacy.dp_clip=1.0",
                           'strategy.fslora.server_optimizer="adam"'])
