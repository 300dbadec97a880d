"""HetLoRA: zero-padding aggregation of heterogeneous ranks (arXiv 2401.06432).

Cho et al., 2024. The global rank is the largest budget. Client ``i`` trains the
leading block ``B[:, :r_i]``, ``A[:r_i, :]``; the server zero-pads every client's
factors to the global rank and averages them. All clients use the one global scale ``alpha / r``, so
a client's block means the same thing in its model and in the global one.
The aggregate replaces the global pair and is what the next round's tasks carry.
With ``norm_weighted``, each client's weight ``p_i`` is multiplied by the Frobenius norm
of its whole update ``||B_i A_i||_F`` (all modules together, one weight per client),
then renormalised: the paper's sparsity-weighted aggregation, which lets clients whose
update is small (e.g. after rank self-pruning) count less. Rank self-pruning itself is
not implemented. With ``aggregate = "increments"`` the server adds the weighted mean of
the padded increments ``pad(B_i' - B_i)``, ``pad(A_i' - A_i)`` to the global pair instead
of replacing it by the mean of the padded factors, which shrinks every slot above a
client's rank even when no client changed anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..clipping import product_norm_sq
from ..methods import BuildContext, Method, first_line
from ..state import PaddedForm, init_factors, lora_scale, padded_mean, round_weights, truncate_rank
from ..types import ClientSpec, ClientTask, ClientUpdate, LoRAState
from .stores import OnePair


class HetLoRA(OnePair):
    name = "hetlora"

    def __init__(self, shapes: Mapping[str, tuple[int, int]], budgets: Sequence[int], alpha: float,
                 seed: int, rslora: bool = False, norm_weighted: bool = False,
                 form: PaddedForm = "factors") -> None:
        self.rank = max(budgets)
        self.scale = lora_scale(alpha, self.rank, rslora)
        self.norm_weighted, self.form = norm_weighted, form
        self.factors: LoRAState = init_factors(shapes, self.rank, torch.Generator().manual_seed(seed))

    def configure(self, rnd: int, clients: Sequence[ClientSpec]) -> dict[int, ClientTask]:
        return {c.cid: ClientTask(factors=truncate_rank(self.factors, min(c.budget, self.rank)),
                                  scale=self.scale) for c in clients}

    def aggregate(self, rnd: int, updates: Mapping[int, ClientUpdate]) -> dict[str, float]:
        if not updates:
            return {}
        cids, weights = round_weights(updates)
        if self.norm_weighted:
            norms = [math.sqrt(sum(product_norm_sq(f.B, f.A) for f in updates[c].factors.values()))
                     for c in cids]
            raw = [w * n for w, n in zip(weights, norms)]
            total = sum(raw)
            weights = [x / total for x in raw] if total > 0 else weights
        # what client i was sent follows from its upload's rank: no memory of the tasks needed
        self.factors = padded_mean(self.factors, [updates[c].factors for c in cids], weights, self.form)
        return {}



@dataclass
class HetLoRASettings:
    """``[strategy.hetlora]``: the aggregation weights and what is averaged."""

    norm_weighted: bool = False  # weight each client by the norm of its update (the paper's option)
    aggregate: PaddedForm = "factors"  # "increments": global += mean of padded increments


def _build(c: BuildContext) -> HetLoRA:
    s: HetLoRASettings = c.settings
    return HetLoRA(c.shapes, c.budgets, c.alpha, c.seed, c.rslora, s.norm_weighted, s.aggregate)


METHOD = Method("hetlora", _build, first_line(__doc__), settings=HetLoRASettings, one_pair=True)
