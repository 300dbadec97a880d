"""Fed-PLoRA: parallel rank-1 modules with Select-N-Fold for heterogeneous budgets (arXiv 2602.16936).

The global adapter is ``R`` rank-1 modules ``(b_j, a_j)``, i.e. one rank-``R`` pair
(``R = strategy.global_rank``), under ONE scale ``s = lora_scale(alpha, R)`` for every module
and client: the global model is ``W0 + s B A``. Each round client ``i`` draws a set ``K_i`` of
``k_i = min(budget, R)`` modules (:func:`fedlora.sketch.sketch_indices`, keyed by (seed,
round, client), the same for every layer), trains ``B[:, K_i]``, ``A[K_i]`` warm-started
from the global values, and gets the other ``R − k_i`` modules folded into its frozen
weights as the low-rank base delta ``s B[:, K̄_i] A[K̄_i]``, so its starting function is the
global model exactly. The server averages each module ``j`` over the clients that trained
it, ``Q_j``, with weights ``p_i / Σ_{Q_j} p`` (or ``1 / |Q_j|``); a module nobody trained is
left as it was. Download: all ``R`` modules (factors and delta); upload: the ``k_i`` trained.
All ``k_i = R``: FedIT's factor averaging. Not exact: per module, a mean of factors is not
the mean of their products.

[I], the method section and code were unreadable: the one global scale (a per-client
``alpha / k_i`` would break the fold identity); one ``K_i`` for all layers (the draw equals
FSLoRA's sketch of the same (seed, round, client, R, k_i)); examples weights renormalised
over ``Q_j`` by default (the reviewers' bound uses ``1 / |Q_j|``: ``module_weights =
"uniform"``; ``"round"`` damps each module's mean by its coverage, see
docs/rank_recovery.md); untrained modules kept; the standard LoRA init shared by all (``A``
Kaiming-uniform, ``B = 0``); the fold as a frozen low-rank branch, not a dense add to ``W0``
(same function, no private dense copy of the weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from ..errors import check
from ..methods import BuildContext, Method, first_line
from ..seeding import torch_generator
from ..sketch import sketch_indices
from ..state import fold_rest, init_factors, lora_scale, round_weights, scatter_add_, take
from ..types import ClientSpec, ClientTask, ClientUpdate, Factors, LoRAState
from .stores import OnePair

ModuleWeights = Literal["examples", "uniform", "round"]


class FedPLoRA(OnePair):
    name = "plora"

    def __init__(self, shapes: Mapping[str, tuple[int, int]], global_rank: int, alpha: float, seed: int,
                 rslora: bool = False, module_weights: ModuleWeights = "examples") -> None:
        self.rank, self.seed = global_rank, seed
        self.scale = lora_scale(alpha, global_rank, rslora)
        self.uniform = module_weights == "uniform"
        self.damped = module_weights == "round"
        self.factors: LoRAState = init_factors(shapes, global_rank, torch_generator(seed, "plora-init"))

    def modules_of(self, rnd: int, cid: int, k: int) -> Tensor:
        """``K_i``: the modules client ``cid`` trains in round ``rnd`` (sorted)."""
        return sketch_indices(self.seed, rnd, cid, self.rank, k)

    def configure(self, rnd: int, clients: Sequence[ClientSpec]) -> dict[int, ClientTask]:
        tasks: dict[int, ClientTask] = {}
        for c in clients:
            trained = self.modules_of(rnd, c.cid, min(c.budget, self.rank))
            tasks[c.cid] = ClientTask(factors=take(self.factors, trained), scale=self.scale,
                                      base_delta=fold_rest(self.factors, trained, self.rank, self.scale))
        return tasks

    def aggregate(self, rnd: int, updates: Mapping[int, ClientUpdate]) -> dict[str, float]:
        if not updates:
            return {}
        cids, p = round_weights(updates)
        total = {n: Factors(A=torch.zeros_like(f.A), B=torch.zeros_like(f.B)) for n, f in self.factors.items()}
        cover = torch.zeros(self.rank, dtype=torch.float64)  # Σ_{Q_j} of the clients' weights
        for c, w in zip(cids, p):
            # K_i follows from (seed, round, client) and the uploaded rank: no memory of the tasks
            idx = self.modules_of(rnd, c, next(iter(updates[c].factors.values())).rank)
            w = 1.0 if self.uniform else w
            scatter_add_(total, updates[c].factors, idx, w)
            cover[idx] += w
        hit = cover > 0  # modules nobody trained are not written: bit-identical
        # "round": the round's clients that did not train module j count as "no change" (weight
        # p_i on the old value), i.e. the renormalised mean damped by the coverage Σ_{Q_j} p_i
        keep = (1 - cover[hit]) if self.damped else torch.zeros(int(hit.sum()), dtype=torch.float64)
        den = torch.ones_like(keep) if self.damped else cover[hit]
        for n, f in self.factors.items():
            f.A[hit] = ((total[n].A[hit] + keep[:, None] * f.A[hit]) / den[:, None]).to(f.A.dtype)
            f.B[:, hit] = ((total[n].B[:, hit] + keep * f.B[:, hit]) / den).to(f.B.dtype)
        return {"module_coverage": hit.double().mean().item()}



@dataclass
class PLoRASettings:
    """``[strategy.plora]``: the weights of each module's average over the clients that trained it."""

    # p_i renormalised over Q_j; 1 / |Q_j|; or "round": p_i over all the round's clients, a client
    # that did not train module j standing for its old value (the mean damped by its coverage:
    # the same update as fslora-u, stable where the renormalised mean diverges)
    module_weights: ModuleWeights = "examples"

    def validate(self) -> None:
        check("strategy.plora.module_weights", self.module_weights in get_args(ModuleWeights),
              f"must be one of {get_args(ModuleWeights)}")


def _build(c: BuildContext) -> FedPLoRA:
    s: PLoRASettings = c.settings
    s.validate()
    return FedPLoRA(c.shapes, c.global_rank, c.alpha, c.seed, c.rslora, s.module_weights)


METHOD = Method("plora", _build, first_line(__doc__), settings=PLoRASettings, one_pair=True)
