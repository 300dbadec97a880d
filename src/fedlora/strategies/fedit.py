"""FedIT: FedAvg on the LoRA factors at one common rank (Zhang et al., arXiv 2305.05644).

In a heterogeneous population the common rank is the smallest budget, so every device
can take part. ``A`` and ``B`` are averaged separately, which is inexact by design
(``mean(B) · mean(A) ≠ mean(B A)``). The same class with the global rank and no regard
for budgets is the full-rank upper bound (``strategies/fullrank.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .. import state as S
from ..types import ClientSpec, ClientTask, ClientUpdate, LoRAState


class FactorAverage:
    def __init__(self, shapes: Mapping[str, tuple[int, int]], rank: int, alpha: float, seed: int,
                 rslora: bool = False, name: str = "fedit") -> None:
        self.name = name
        self.rank = rank
        self.scale = S.lora_scale(alpha, rank, rslora)
        self.factors: LoRAState = S.init_factors(shapes, rank, torch.Generator().manual_seed(seed))

    def configure(self, rnd: int, clients: Sequence[ClientSpec]) -> dict[int, ClientTask]:
        return {c.cid: ClientTask(factors=S.clone(self.factors), scale=self.scale) for c in clients}

    def aggregate(self, rnd: int, updates: Mapping[int, ClientUpdate]) -> dict[str, float]:
        if not updates:
            return {}
        cids, weights = S.round_weights(updates)
        self.factors = S.weighted_sum([updates[c].factors for c in cids], weights)
        return {}

    def global_task(self) -> ClientTask:
        return ClientTask(factors=S.clone(self.factors), scale=self.scale)

    def state_dict(self) -> dict:
        return {"factors": S.clone(self.factors)}

    def load_state_dict(self, sd: dict) -> None:
        self.factors = S.clone(sd["factors"])
