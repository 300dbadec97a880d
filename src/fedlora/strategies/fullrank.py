"""Upper bound that IGNORES BUDGETS: FedAvg on factors at the global rank (arXiv 1602.05629).

Every client trains rank ``strategy.global_rank`` whatever its budget, so no real
device constraint is respected; it shows what heterogeneity costs. Same aggregation as FedIT
(``fedit.FactorAverage``), built with a different rank and name: composition, no subclass.
"""

from __future__ import annotations

from collections.abc import Mapping

from .fedit import FactorAverage


def full_rank_upper_bound(shapes: Mapping[str, tuple[int, int]], global_rank: int, alpha: float,
                          seed: int, rslora: bool = False) -> FactorAverage:
    return FactorAverage(shapes, global_rank, alpha, seed, rslora, name="fullrank")
