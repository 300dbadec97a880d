import importlib.util

import numpy as np
import pytest

from fedlora.budgets import client_budgets, rank_probabilities
from fedlora.config import BudgetConfig
from fedlora.partition import dirichlet_partition, group_partition, iid_partition, stratified_holdout

LABELS = np.repeat([0, 1, 2], [500, 300, 200])


def assert_disjoint_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n


def test_iid_covers_everything_evenly():
    parts = iid_partition(1000, 7, seed=0)
    assert_disjoint_cover(parts, 1000)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_is_a_partition_seeded_and_skewed():
    parts = dirichlet_partition(LABELS, 10, alpha=0.1, seed=0, min_size=5)
    assert_disjoint_cover(parts, 1000)
    assert all(len(p) >= 5 for p in parts)
    again = dirichlet_partition(LABELS, 10, alpha=0.1, seed=0, min_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    # alpha 0.1: a typical client is dominated by one class; alpha 100: close to the global mix
    def dominance(ps):
        return np.mean([np.bincount(LABELS[p], minlength=3).max() / len(p) for p in ps])
    assert dominance(parts) > 0.8
    assert dominance(dirichlet_partition(LABELS, 10, alpha=100.0, seed=0)) < 0.6


def test_dirichlet_impossible_request_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot fill"):
        dirichlet_partition(LABELS[:20], 10, alpha=0.1, seed=0, min_size=5)


def test_group_partition_one_group_per_client():
    groups = np.array(["a"] * 10 + ["b"] * 6 + ["c"] * 4)
    parts = group_partition(groups, 5, seed=0)
    assert_disjoint_cover(parts, 20)
    assert all(len(set(groups[p])) == 1 for p in parts)
    with pytest.raises(ValueError, match="one client per group"):
        group_partition(groups, 2, seed=0)


def test_stratified_holdout_keeps_class_shares():
    train, test = stratified_holdout(LABELS, 100, seed=0)
    assert len(test) == 100 and len(np.intersect1d(train, test)) == 0 and len(train) == 900
    assert list(np.bincount(LABELS[test])) == [50, 30, 20]


@pytest.mark.parametrize("dist", ["uniform", "normal", "heavy-tail-low", "heavy-tail-high"])
def test_budget_distributions(dist):
    p = rank_probabilities(4, dist)
    assert p.sum() == pytest.approx(1.0) and (p > 0).all()
    b = client_budgets(BudgetConfig(ranks=[8, 16, 32, 64], distribution=dist), 2000, seed=0)
    assert b == client_budgets(BudgetConfig(ranks=[8, 16, 32, 64], distribution=dist), 2000, seed=0)
    share = {r: b.count(r) / 2000 for r in (8, 16, 32, 64)}
    if dist == "heavy-tail-low":
        assert share[8] == pytest.approx(0.8, abs=0.03)
    if dist == "heavy-tail-high":
        assert share[64] == pytest.approx(0.8, abs=0.03)
    if dist == "normal":
        assert share[16] + share[32] > share[8] + share[64]
    if dist == "uniform":
        assert all(abs(s - 0.25) < 0.04 for s in share.values())


def test_explicit_budgets_and_budget_file(tmp_path):
    assert client_budgets(BudgetConfig(per_client=[4, 8]), 2, 0) == [4, 8]
    f = tmp_path / "b.toml"
    f.write_text("budgets = [2, 4, 6]\n")
    assert client_budgets(BudgetConfig(file=str(f)), 3, 0) == [2, 4, 6]


def test_balanced_dirichlet_equal_sizes_and_skew():
    from fedlora.partition import balanced_dirichlet_partition

    parts = balanced_dirichlet_partition(LABELS, 10, alpha=0.1, seed=0)
    assert {len(p) for p in parts} == {100}
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)
    dom = np.mean([np.bincount(LABELS[p], minlength=3).max() / len(p) for p in parts])
    assert dom > 0.8
    mild = balanced_dirichlet_partition(LABELS, 10, alpha=100.0, seed=0)
    assert np.mean([np.bincount(LABELS[p], minlength=3).max() / len(p) for p in mild]) < 0.65


def test_builtin_dialog_corpus_loads_as_topic_classification():
    import pytest as _pytest

    from fedlora.config import DataConfig
    from fedlora.data import load_text_dataset

    if importlib.util.find_spec("chatterbot_corpus") is None:
        _pytest.skip("chatterbot-corpus is not installed")
    ds = load_text_dataset(DataConfig(name="builtin:chatterbot", label_column="topic"))
    assert len(ds.texts) > 1500 and len(ds.label_names) == 21
    assert "food" in ds.label_names and all(t.strip() for t in ds.texts)
