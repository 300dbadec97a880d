"""FedAvg on the LoRA factors at one common rank: ``A`` and ``B`` averaged separately.

The aggregation behind FedIT (rank = the smallest budget) and the full-rank reference
(rank = the global rank, budgets ignored); each of those is a registry record that builds
this class with its own rank and name. Averaging the factors separately is inexact by
design: ``mean(B) · mean(A) ≠ mean(B A)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..state import clone, init_factors, lora_scale, round_weights, weighted_sum
from ..types import ClientSpec, ClientTask, ClientUpdate, LoRAState
from .stores import OnePair


class FactorAverage(OnePair):
    def __init__(self, shapes: Mapping[str, tuple[int, int]], rank: int, alpha: float, seed: int,
                 rslora: bool = False, name: str = "fedit") -> None:
        self.name = name
        self.rank = rank
        self.scale = lora_scale(alpha, rank, rslora)
        self.factors: LoRAState = init_factors(shapes, rank, torch.Generator().manual_seed(seed))

    def configure(self, rnd: int, clients: Sequence[ClientSpec]) -> dict[int, ClientTask]:
        return {c.cid: ClientTask(factors=clone(self.factors), scale=self.scale) for c in clients}

    def aggregate(self, rnd: int, updates: Mapping[int, ClientUpdate]) -> dict[str, float]:
        if not updates:
            return {}
        cids, weights = round_weights(updates)
        self.factors = weighted_sum([updates[c].factors for c in cids], weights)
        return {}
