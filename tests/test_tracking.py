"""log.report_to: every round's scalar metrics in TensorBoard; a tracker that is not installed is one line."""

import importlib.util

import pytest

from fedlora.cli import main
from fedlora.config import ConfigError, load_config

from .conftest import tiny_overrides


def test_tensorboard_gets_every_rounds_scalars(tiny_bert_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["run", *tiny_overrides(tiny_bert_dir, out, federation__eval_every=1),
                 'log.report_to=["tensorboard"]', "--quiet"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"eval_accuracy", "eval_loss", "train_loss", "bytes_up", "fidelity"} <= tags
    assert "dropped_clients" not in tags  # not a number
    assert [e.step for e in events.Scalars("eval_accuracy")] == [0, 1, 2]
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2]


def test_off_by_default_and_a_missing_tracker_is_one_line(tiny_bert_dir, tmp_path):
    assert load_config(None, []).log.report_to == []
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match=r"^log.report_to: wandb is not installed: pip install wandb$"):
            load_config(None, ['log.report_to=["wandb"]'])
    with pytest.raises(ConfigError, match=r"log.report_to\[0\]: must be one of tensorboard, wandb; got 'mlflow'"):
        load_config(None, ['log.report_to=["mlflow"]'])
