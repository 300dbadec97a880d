"""FLoRA: exact stacking of heterogeneous-rank pairs, merged into the base (arXiv 2409.05976).

Wang et al., NeurIPS 2024. Each round the server stacks the clients' pairs,
``[p_1 s_1 B_1, …] · [A_1; …]`` = ``Σ p_i s_i B_i A_i`` exactly, and adds them to a
frozen delta on top of ``W0`` that every task carries (``ClientTask.base_delta``, scale
folded into ``B``). Every client starts every round from a fresh LoRA of its own rank
(``A`` seeded per (seed, round, client), ``B = 0``). The delta's rank grows by ``Σ r_i``
a round; once it reaches ``min(m, n)`` it is re-factored exactly by SVD, so it never
exceeds that.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..lowrank import add_to_delta
from ..methods import Method, always, first_line
from ..state import lora_scale, round_weights
from ..types import ClientUpdate, LoRAState
from .stores import MergedBase


class FLoRA(MergedBase):
    name = "flora"

    def __init__(self, shapes: Mapping[str, tuple[int, int]], alpha: float, seed: int,
                 rslora: bool = False) -> None:
        self.shapes = dict(shapes)
        self.alpha, self.rslora, self.seed = alpha, rslora, seed
        self.delta: LoRAState = {}  # cumulative merged update per module (scale folded in)

    def aggregate(self, rnd: int, updates: Mapping[int, ClientUpdate]) -> dict[str, float]:
        if not updates:
            return {}
        cids, p = round_weights(updates)
        for name in self.shapes:
            new = [updates[c].factors[name] for c in cids]
            # s_i follows from the rank the client trained: no memory of the tasks needed
            weights = [w * lora_scale(self.alpha, f.rank, self.rslora) for w, f in zip(p, new)]
            self.delta[name] = add_to_delta(self.delta.get(name), new, weights)
        return {"delta_rank": float(next(iter(self.delta.values())).rank)}



METHOD = Method("flora", lambda c: FLoRA(c.shapes, c.alpha, c.seed, c.rslora), first_line(__doc__), exact=always,
                averages="product")
