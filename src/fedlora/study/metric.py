"""What a study scores a task by, chosen per kind of task, never from a run's ``final_metric_name``
(a generative run names Rouge-L there when it generates, but the study ranks by the answer loss):

- classification: held-out accuracy (higher is better);
- a generative format (``data.format`` other than "classification"): the held-out answer loss
  (lower is better), then Rouge-L of greedy generations when the task generates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import RunConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class Metric:
    key: str  # final_<key> in summary.json, eval_<key> in metrics.jsonl
    label: str  # as the report names it
    higher_is_better: bool
    tie: float  # a paired difference whose whole 95% interval lies within ±tie is a tie

    @property
    def sign(self) -> int:
        """+1 or -1: sign * value grows as the metric gets better."""
        return 1 if self.higher_is_better else -1


ACCURACY = Metric("accuracy", "accuracy", True, 0.005)
LOSS = Metric("loss", "answer loss", False, 0.01)  # nats per answer token: ±0.01 is perplexity within 1%
ROUGE_L = Metric("rouge_l", "Rouge-L", True, 0.005)


def is_generative(cfg: RunConfig) -> bool:
    return cfg.data.format != "classification"


def headline(cfg: RunConfig) -> Metric:
    """The metric a task's sweep, tables and verdicts rank by."""
    return LOSS if is_generative(cfg) else ACCURACY


def best_rate(scores: Mapping[float, float], metric: Metric, what: str) -> float:
    """The rate whose final ``metric`` is best (ties: the smaller rate); a diverged run (nan or inf)
    is never chosen, and a grid where every run diverged is an error naming ``what`` was swept."""
    finite = {lr: v for lr, v in scores.items() if math.isfinite(v)}
    if not finite:
        raise ConfigError(f"{what}: every rate of the sweep diverged ({metric.label} not finite); "
                          "add smaller rates to sweep.lrs")
    return max(sorted(finite), key=lambda lr: (metric.sign * finite[lr], -lr))
