"""Clipping on ΔW via Gram matrices, DP noise and accounting (issue 5 acceptance 4-6)."""

import math

import pytest
import torch

from fedlora import state as S
from fedlora.clipping import change_norm_sq, clip_update, product_norm_sq, update_norm
from fedlora.config import ConfigError, PrivacyConfig, load_config
from fedlora.server import FederatedServer
from fedlora.strategies.fslora import FSLoRA
from fedlora.types import ClientTask, ClientUpdate, Factors


def rand_factors(r, m, n, g, scale=1.0):
    return Factors(A=torch.randn(r, n, generator=g, dtype=torch.float64) * scale,
                   B=torch.randn(m, r, generator=g, dtype=torch.float64) * scale)


@pytest.mark.parametrize("seed", range(5))
def test_gram_norm_equals_dense_norm_for_mixed_ranks(seed):
    g = torch.Generator().manual_seed(seed)
    for r, m, n in [(1, 7, 3), (4, 9, 12), (16, 5, 6)]:  # r > min(m, n) included
        f = rand_factors(r, m, n, g)
        assert product_norm_sq(f.B, f.A) == pytest.approx(float(torch.linalg.norm(f.B @ f.A) ** 2), rel=1e-10)
        f2 = rand_factors(r, m, n, g)
        dense = 0.7 * (f2.B @ f2.A - f.B @ f.A)
        assert change_norm_sq(f, f2, 0.7) == pytest.approx(float(torch.linalg.norm(dense) ** 2), rel=1e-10)


@pytest.mark.parametrize("seed", range(8))
def test_clipped_update_respects_the_bound(seed):
    g = torch.Generator().manual_seed(seed)
    ranks = [2, 5, 3]
    shapes = [(8, 6), (4, 9), (7, 7)]
    sent = {f"m{i}": rand_factors(r, m, n, g) for i, (r, (m, n)) in enumerate(zip(ranks, shapes))}
    trained = {k: Factors(A=f.A + torch.randn(f.A.shape, generator=g, dtype=torch.float64) * 3,
                          B=f.B + torch.randn(f.B.shape, generator=g, dtype=torch.float64) * 3)
               for k, f in sent.items()}
    task = ClientTask(factors=sent, scale=1.3, head={"h": torch.zeros(3, dtype=torch.float64)})
    update = ClientUpdate(factors=trained, num_examples=5, head={"h": torch.ones(3, dtype=torch.float64)})
    dense_norm = math.sqrt(sum(float(torch.linalg.norm(1.3 * (trained[k].B @ trained[k].A - f.B @ f.A)) ** 2)
                               for k, f in sent.items()) + 3.0)
    assert update_norm(task, update) == pytest.approx(dense_norm, rel=1e-9)
    C = dense_norm / (2 + seed)
    clipped, before = clip_update(task, update, C)
    assert before == pytest.approx(dense_norm, rel=1e-9)
    after = update_norm(task, clipped)
    assert after <= C * (1 + 1e-6)
    assert after >= C * 0.999  # shrunk to the bound, not to nothing
    same, _ = clip_update(task, update, dense_norm * 2)
    assert same is update  # under the bound: untouched


def make_dp_server(noise=1.0, clip=0.5):
    strat = FSLoRA({"m": (40, 50)}, global_rank=16, alpha=16.0, seed=0)
    privacy = PrivacyConfig(noise_multiplier=noise, dp_clip=clip)
    return FederatedServer(strat, {}, budgets=[16] * 4, num_examples=[5] * 4, privacy=privacy,
                           seed=3, sample_rate=0.5)


def test_dp_noise_added_once_with_the_configured_std_and_reproducible():
    server = make_dp_server()
    before = S.clone(server.strategy.factors)
    tasks = server.configure(1, [0, 1, 2, 3])
    # clients send back exactly what they got: the whole change is the noise
    metrics = server.aggregate(1, tasks, {c: ClientUpdate(S.clone(t.factors), 5) for c, t in tasks.items()})
    noise = torch.cat([(server.strategy.factors["m"].A - before["m"].A).flatten(),
                       (server.strategy.factors["m"].B - before["m"].B).flatten()])
    expected = 1.0 * 0.5 / 4  # multiplier * clip / clients
    assert noise.std().item() == pytest.approx(expected, rel=0.03)
    assert abs(noise.mean().item()) < 4 * expected / math.sqrt(noise.numel())
    assert server.dp_rounds == 1
    # same seed -> the same noise
    again = make_dp_server()
    t2 = again.configure(1, [0, 1, 2, 3])
    again.aggregate(1, t2, {c: ClientUpdate(S.clone(t.factors), 5) for c, t in t2.items()})
    assert torch.equal(again.strategy.factors["m"].A, server.strategy.factors["m"].A)
    assert metrics["dp_epsilon"] > 0


def test_reported_epsilon_matches_opacus():
    opacus = pytest.importorskip("opacus")
    server = make_dp_server(noise=1.1)
    for rnd in range(1, 6):
        tasks = server.configure(rnd, [0, 1])
        m = server.aggregate(rnd, tasks, {c: ClientUpdate(S.clone(t.factors), 5) for c, t in tasks.items()})
    acc = opacus.accountants.RDPAccountant()
    for _ in range(5):
        acc.step(noise_multiplier=1.1, sample_rate=0.5)
    assert m["dp_epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)


@pytest.mark.parametrize("override, key", [
    ("privacy.clip_norm=-1.0", "privacy.clip_norm"),
    ("privacy.noise_multiplier=1.0", "privacy.noise_multiplier"),
    ("federation.fraction=0.0", "federation.fraction"),
    ("budgets.ranks=[8, 65]", "budgets.ranks"),
    ("reliability.dropout=1.0", "reliability.dropout"),
])
def test_malformed_privacy_and_reliability_configs_fail_at_load(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])
