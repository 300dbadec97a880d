"""FedIT: FedAvg on the LoRA factors, every client at the smallest budget (arXiv 2305.05644).

Zhang et al. In a heterogeneous population the common rank is the smallest budget, so
every device can take part. ``A`` and ``B`` are averaged separately
(:class:`~fedlora.strategies.factor_average.FactorAverage`), which is inexact by design.
"""

from __future__ import annotations

from ..methods import Method, first_line
from .factor_average import FactorAverage

METHOD = Method("fedit", lambda c: FactorAverage(c.shapes, min(c.budgets), c.alpha, c.seed, c.rslora, name="fedit"),
                first_line(__doc__), one_pair=True)
