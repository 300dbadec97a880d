"""FFA-LoRA: ``A`` frozen at its random init, only ``B`` trained and averaged (arXiv 2403.12313).

Sun et al., ICLR 2024. With ``A`` fixed the average is exact:
``Σ p_i B_i A = (Σ p_i B_i) A``. Heterogeneous budgets use the leading rows of one
frozen rank-``max r_i`` ``A`` (client ``i`` trains ``B[:, :r_i]``), and zero-padding ``B_i`` keeps the average exact:
``Σ p_i pad(B_i) A = Σ p_i B_i A[:r_i]``. Clients upload only ``B``: the task and the
update set ``freeze_A`` and ``types.tensors_of`` then leaves ``A`` out of the update's
payload (the receiver restores it from the task).
With unequal budgets the mean of the padded ``B_i`` shrinks every column above a
client's rank even in a round where nobody changed anything; ``aggregate =
"increments"`` instead adds the weighted mean of the padded increments ``pad(B_i' - B_i)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..methods import Method, first_line
from ..state import PaddedForm, init_factors, lora_scale, padded_mean, round_weights, truncate_rank
from ..types import ClientSpec, ClientTask, ClientUpdate, Factors, LoRAState
from .stores import OnePair


class FFALoRA(OnePair):
    name = "ffa"
    freeze_A = True  # A stays at its seeded init: clients neither train nor upload it

    def __init__(self, shapes: Mapping[str, tuple[int, int]], budgets: Sequence[int], alpha: float,
                 seed: int, rslora: bool = False, form: PaddedForm = "factors") -> None:
        self.rank = max(budgets)
        self.form = form
        self.scale = lora_scale(alpha, self.rank, rslora)
        self.factors: LoRAState = init_factors(shapes, self.rank, torch.Generator().manual_seed(seed))

    def configure(self, rnd: int, clients: Sequence[ClientSpec]) -> dict[int, ClientTask]:
        return {c.cid: ClientTask(factors=truncate_rank(self.factors, min(c.budget, self.rank)),
                                  scale=self.scale, freeze_A=True) for c in clients}

    def aggregate(self, rnd: int, updates: Mapping[int, ClientUpdate]) -> dict[str, float]:
        if not updates:
            return {}
        cids, weights = round_weights(updates)
        mean_B = padded_mean(self.factors, [updates[c].factors for c in cids], weights, self.form)
        # A never moves: only B is taken from the clients
        self.factors = {n: Factors(A=f.A, B=mean_B[n].B) for n, f in self.factors.items()}
        return {}



@dataclass
class FFASettings:
    """``[strategy.ffa]``: what is averaged when budgets differ."""

    aggregate: PaddedForm = "factors"  # "increments": B += mean of padded increments


METHOD = Method("ffa", lambda c: FFALoRA(c.shapes, c.budgets, c.alpha, c.seed, c.rslora, c.settings.aggregate),
                first_line(__doc__), settings=FFASettings,
                exact=lambda s: s.aggregate == "factors",  # Σ p_i pad(B_i) A = Σ p_i B_i A[:r_i]
                one_pair=True)
