"""Clipping measured on ΔW from Gram matrices: equal to the dense norm, and the bound holds."""

import math

import pytest
import torch

from fedlora.clipping import change_norm_sq, clip_update, product_norm_sq, update_norm
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


def test_fslora_clips_the_change_to_the_global_model_not_the_clients_rescaled_one():
    from fedlora.strategies.fslora import FSLoRA
    from fedlora.types import ClientSpec

    g = torch.Generator().manual_seed(0)
    strat = FSLoRA({"m": (12, 10)}, global_rank=8, alpha=8.0, seed=0)
    strat.factors["m"].B.copy_(torch.randn(12, 8, generator=g))
    task = strat.configure(1, [ClientSpec(0, 2, 5)])[0]  # budget 2 of 8: trains at s * r / k = 4 s
    assert task.effect_scale == strat.scale and task.scale == pytest.approx(4 * strat.scale)
    sent = task.factors["m"]
    step = Factors(A=torch.randn(sent.A.shape, generator=g), B=torch.randn(sent.B.shape, generator=g))
    trained = Factors(A=sent.A + step.A, B=sent.B + step.B)
    update = ClientUpdate(factors={"m": trained}, num_examples=5)

    def global_change(u):  # what the update alone would do to the dense global weight
        return strat.scale * (u.factors["m"].B.double() @ u.factors["m"].A.double() - sent.B.double() @ sent.A.double())

    dense = torch.linalg.norm(global_change(update)).item()
    assert update_norm(task, update) == pytest.approx(dense, rel=1e-9)
    C = dense / 3
    clipped, _ = clip_update(task, update, C)
    assert torch.linalg.norm(global_change(clipped)).item() == pytest.approx(C, rel=1e-6)


def test_adaptive_clip_tracks_the_target_quantile_of_the_norms():
    from fedlora.clipping import AdaptiveClip

    clip = AdaptiveClip(bound=1.0, quantile=0.5, lr=0.2)
    norms = [float(n) for n in range(1, 11)]  # the median lies between 5 and 6
    for _ in range(200):
        clip.step(norms)
    assert 5.0 <= clip.bound <= 6.0
    low = AdaptiveClip(bound=100.0, quantile=0.9, lr=0.2)
    for _ in range(200):
        low.step(norms)
    assert 9.0 <= low.bound <= 10.0


def test_outliers_far_above_the_median_are_zeroed_and_the_rest_clipped():
    from fedlora.clipping import bound_updates

    g = torch.Generator().manual_seed(3)
    tasks, updates = {}, {}
    for c, size in enumerate([1.0, 1.2, 0.9, 50.0]):  # client 3 is a wild update
        sent = rand_factors(2, 6, 5, g)
        tasks[c] = ClientTask(factors={"m": sent}, scale=1.0)
        step = rand_factors(2, 6, 5, g, scale=size * 0.1)
        updates[c] = ClientUpdate(factors={"m": Factors(A=sent.A + step.A, B=sent.B + step.B)}, num_examples=5)
    smallest = min(update_norm(tasks[c], u) for c, u in updates.items())
    out, norms, metrics = bound_updates(tasks, updates, clip_norm=smallest, outlier_factor=5.0)
    assert metrics == {"zeroed": 1.0, "clipped": 2.0} and norms[3] == max(norms.values())
    assert torch.equal(out[3].factors["m"].B, tasks[3].factors["m"].B)  # as if it had not trained
    assert all(update_norm(tasks[c], out[c]) <= smallest * (1 + 1e-6) for c in range(3))


def test_clip_norm_takes_a_number_or_auto():
    from fedlora.config import ConfigError, load_config

    assert load_config(None, ['privacy.clip_norm="auto"']).privacy.clip_norm == "auto"
    assert load_config(None, ["privacy.clip_norm=2"]).privacy.clip_norm == 2.0
    with pytest.raises(ConfigError, match="privacy.clip_norm: expected float, got 'often' or must be one of auto"):
        load_config(None, ['privacy.clip_norm="often"'])


@pytest.mark.parametrize("seed", range(4))
def test_factor_norm_is_the_increments_at_the_global_scale_times_the_pairs_norm(seed):
    from fedlora.clipping import effect_norm, factor_norm
    from fedlora.strategies.fslora import FSLoRA
    from fedlora.types import ClientSpec

    g = torch.Generator().manual_seed(seed)
    strat = FSLoRA({"q": (12, 10), "v": (9, 10)}, global_rank=8, alpha=8.0, seed=seed)
    for f in strat.factors.values():
        f.B.copy_(torch.randn(f.B.shape, generator=g))
    task = strat.configure(1, [ClientSpec(0, 2, 5)])[0]  # trains at 4 s; its increments move the global at s
    task.head = {"h": torch.zeros(3)}
    up = ClientUpdate(factors={n: Factors(A=f.A + torch.randn(f.A.shape, generator=g),
                                          B=f.B + torch.randn(f.B.shape, generator=g))
                               for n, f in task.factors.items()}, num_examples=5, head={"h": torch.ones(3)})
    ref = 3.0  # the head's increment, squared
    for n, f in task.factors.items():
        gn = max(torch.linalg.norm(f.A.double()), torch.linalg.norm(f.B.double()))
        inc = torch.cat([(up.factors[n].A.double() - f.A.double()).flatten(),
                         (up.factors[n].B.double() - f.B.double()).flatten()])
        ref += float(strat.scale * gn * torch.linalg.norm(inc)) ** 2
    assert factor_norm(task, up) == pytest.approx(math.sqrt(ref), rel=1e-9)
    assert effect_norm(task, up) == max(factor_norm(task, up), update_norm(task, up))
    C = effect_norm(task, up) / 5
    clipped, _ = clip_update(task, up, C, factors=True)
    assert C * 0.999 <= effect_norm(task, clipped) <= C * (1 + 1e-6)


def test_a_product_neutral_pair_measures_zero_on_the_product_but_not_on_the_factors():
    from fedlora.clipping import effect_norm

    g = torch.Generator().manual_seed(1)
    sent = Factors(A=torch.randn(3, 7, generator=g, dtype=torch.float64), B=torch.zeros(6, 3, dtype=torch.float64))
    task = ClientTask(factors={"m": sent}, scale=2.0)
    neutral = ClientUpdate(factors={"m": Factors(A=torch.zeros(3, 7, dtype=torch.float64),
                                                 B=torch.full((6, 3), 1e3, dtype=torch.float64))}, num_examples=5)
    assert update_norm(task, neutral) == 0.0  # B'A' = 0 = BA
    assert effect_norm(task, neutral) > 1e3


def test_adaptive_clip_starts_at_the_first_rounds_median():
    from fedlora.clipping import AdaptiveClip

    clip = AdaptiveClip(bound=0.0, quantile=0.5, lr=0.2)
    assert clip.bound_for([3.0, 1e9, 2.0, 5.0, 4.0]) == 4.0  # one wild norm does not set it
    clip.step([3.0, 1e9, 2.0, 5.0, 4.0])  # 3 of 5 at or under: the bound shrinks
    assert clip.bound_for([100.0]) == pytest.approx(4.0 * math.exp(-0.2 * (0.6 - 0.5)))


def test_each_method_declares_what_its_server_averages():
    from fedlora.strategies import METHODS

    product = {"flexlora", "flora", "florist", "raflora", "fedex"}
    assert {n for n, m in METHODS.items() if m.averages == "product"} == product
    assert all(METHODS[n].averages == "factors" for n in ("fslora", "fedit", "hetlora", "fullrank", "plora", "ffa"))
