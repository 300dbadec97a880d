"""The round-0 evaluation is remembered only for a model and data that score the same."""

import pytest
import torch

from fedlora import initial_eval
from fedlora.config import load_config
from fedlora.experiment import build_experiment, evaluate_global
from fedlora.initial_eval import evaluate_initial, model_key

from .conftest import tiny_overrides


@pytest.fixture
def counted(monkeypatch):
    """Counts the evaluations really computed; starts with nothing remembered."""
    monkeypatch.setattr(initial_eval, "_REMEMBERED", initial_eval.OrderedDict())
    calls = []

    def counting(exp, samples=None):
        calls.append(exp.cfg.strategy.name)
        return evaluate_global(exp, samples)

    monkeypatch.setattr(initial_eval, "evaluate_global", counting)
    return calls


def _exp(model_dir, tmp_path, **extra):
    return build_experiment(load_config(None, tiny_overrides(model_dir, tmp_path / "run", **extra)))


def test_methods_of_one_seed_share_one_evaluation_with_the_same_numbers(tiny_bert_dir, tmp_path, counted):
    fslora, flexlora = (_exp(tiny_bert_dir, tmp_path, strategy__name=f'"{m}"') for m in ("fslora", "flexlora"))
    first = evaluate_initial(fslora, [])
    second = evaluate_initial(flexlora, [])
    assert counted == ["fslora"]  # flexlora's factors differ (rank, A), but B = 0: the same model
    assert second == first == evaluate_global(flexlora)
    second["accuracy"] = -1.0  # a caller's copy: what is remembered does not change
    assert evaluate_initial(flexlora, [])["accuracy"] == first["accuracy"]


@pytest.mark.parametrize("change", ["seed", "eval_batch", "nonzero_b"])
def test_a_model_or_data_that_differs_is_evaluated_again(tiny_bert_dir, tmp_path, counted, change):
    base = _exp(tiny_bert_dir, tmp_path)
    if change == "seed":  # another head initialisation and held-out sample
        other = _exp(tiny_bert_dir, tmp_path, seed=1)
    elif change == "eval_batch":
        other = _exp(tiny_bert_dir, tmp_path, federation__eval_batch_size=7)
    else:
        other = _exp(tiny_bert_dir, tmp_path)
        task = other.server.global_task()
        name = sorted(task.factors)[0]
        task.factors[name].B.add_(1e-3 * torch.randn_like(task.factors[name].B))
        other.server.global_task = lambda: task
    evaluate_initial(base, [])
    evaluate_initial(other, [])
    assert len(counted) == 2
    base.lm.load(base.server.global_task())
    other.lm.load(other.server.global_task())
    assert model_key(base) != model_key(other)


def test_remote_evaluation_is_never_remembered(tiny_bert_dir, tmp_path, counted):
    exp = _exp(tiny_bert_dir, tmp_path, eval__where='"clients"')
    exp.client_evaluator = lambda e, task: {0: (3, {"accuracy": 0.5, "loss": 1.0})}
    assert evaluate_initial(exp, [])["accuracy"] == 0.5
    evaluate_initial(exp, [])
    assert counted == ["fslora", "fslora"] and not initial_eval._REMEMBERED  # asked each time, never kept
