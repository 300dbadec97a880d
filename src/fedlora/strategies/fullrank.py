"""Full-rank reference, IGNORES BUDGETS: FedAvg on the factors at the global rank (arXiv 1602.05629).

Every client trains rank ``strategy.global_rank`` whatever its budget, so no real device
constraint is respected; it shows what heterogeneity costs (the field's "upper bound",
which it is not always). The aggregation is FedIT's
(:class:`~fedlora.strategies.factor_average.FactorAverage`) at another rank and name.
"""

from __future__ import annotations

from ..methods import Method, first_line
from .factor_average import FactorAverage

METHOD = Method(
    "fullrank", lambda c: FactorAverage(c.shapes, c.global_rank, c.alpha, c.seed, c.rslora, name="fullrank"),
    first_line(__doc__), respects_budgets=False, one_pair=True)
