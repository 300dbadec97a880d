"""Per-client LoRA rank budgets: given explicitly, or drawn from a named distribution.

Distributions over a sorted set of ranks (as in FlexLoRA's and FSLoRA's studies):
``uniform``; ``normal`` (mass on the middle ranks); ``heavy-tail-low`` (80% of clients
at the smallest rank, the rest uniform); ``heavy-tail-high`` (80% at the largest).
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np

from .config import BudgetConfig, Distribution, read_toml
from .errors import ConfigError
from .seeding import numpy_rng

HEAVY_TAIL_SHARE = 0.8


def rank_probabilities(num_ranks: int, distribution: str) -> np.ndarray:
    """Probability of each rank of a sorted rank set under a named distribution."""
    if num_ranks == 1:
        return np.ones(1)
    if distribution == "uniform":
        return np.full(num_ranks, 1 / num_ranks)
    if distribution == "normal":
        pos = np.arange(num_ranks)
        centre, width = (num_ranks - 1) / 2, max(num_ranks / 4, 0.5)
        p = np.exp(-0.5 * ((pos - centre) / width) ** 2)
        return p / p.sum()
    if distribution in ("heavy-tail-low", "heavy-tail-high"):
        p = np.full(num_ranks, (1 - HEAVY_TAIL_SHARE) / (num_ranks - 1))
        p[0 if distribution == "heavy-tail-low" else -1] = HEAVY_TAIL_SHARE
        return p
    raise ValueError(f"budget distribution must be one of {get_args(Distribution)}, got {distribution!r}")


def client_budgets(cfg: BudgetConfig, num_clients: int, seed: int, global_rank: int | None = None) -> list[int]:
    """One rank budget per client, reproducible from the seed. ``global_rank``: the cap the file's
    budgets are checked against (the config's own budgets are checked when it loads)."""
    if cfg.file:
        per_client = read_budgets_file(Path(cfg.file))
        if len(per_client) != num_clients:
            raise ConfigError(f"budgets.file: {len(per_client)} budgets for {num_clients} clients")
        too_big = [b for b in per_client if global_rank is not None and b > global_rank]
        if too_big:
            raise ConfigError(f"budgets.file: {cfg.file}: budgets {too_big} exceed the global rank "
                              f"strategy.global_rank = {global_rank}")
        return per_client
    if cfg.per_client:
        return list(cfg.per_client)
    ranks = sorted(set(cfg.ranks))
    p = rank_probabilities(len(ranks), cfg.distribution)
    draw = numpy_rng(seed, "budgets").choice(len(ranks), size=num_clients, p=p)
    return [ranks[i] for i in draw]


def read_budgets_file(path: Path) -> list[int]:
    """A TOML file with ``budgets = [..]`` (as written by ``fedlora plan``)."""
    data = read_toml(path, "budgets.file: budgets")
    try:
        budgets = [int(b) for b in data["budgets"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"budgets.file: {path} needs a list 'budgets = [...]' ({e})") from None
    if any(b <= 0 for b in budgets):
        raise ConfigError(f"budgets.file: ranks must be positive, got {budgets}")
    return budgets
