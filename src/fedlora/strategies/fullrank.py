"""Full-rank upper bound: FedAvg on factors with every client at the global rank.

It ignores the clients' budgets (no real device constraint is respected); it shows
what heterogeneity costs. Same aggregation as FedIT (``fedit.FactorAverage``).
"""

from __future__ import annotations

from collections.abc import Mapping

from .fedit import FactorAverage


def full_rank_upper_bound(shapes: Mapping[str, tuple[int, int]], global_rank: int, alpha: float,
                          seed: int, rslora: bool = False) -> FactorAverage:
    return FactorAverage(shapes, global_rank, alpha, seed, rslora, name="fullrank")
