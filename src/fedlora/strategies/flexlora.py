"""FlexLoRA: clients keep their own ranks; the server redistributes the best rank-r_i
approximation of the averaged full update (arXiv 2402.11505, Bai et al.).

The server never forms ``ΔW = Σ p_i s_i B_i A_i``: it decomposes the stacked factors
(:mod:`fedlora.lowrank`) once per layer per round, and truncates once per distinct rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .. import state as S
from ..lowrank import SVD, stack, svd_of_product
from ..seeding import torch_generator
from ..types import ClientSpec, ClientTask, ClientUpdate, LoRAState


class FlexLoRA:
    name = "flexlora"

    def __init__(self, shapes: Mapping[str, tuple[int, int]], alpha: float, seed: int,
                 rslora: bool = False, sigma_split: str = "balanced") -> None:
        self.shapes = dict(shapes)
        self.alpha, self.rslora, self.seed, self.split = alpha, rslora, seed, sigma_split
        self.svd: dict[str, SVD] = {}  # the latest ΔW per module; empty before round 1
        self._scales: dict[int, float] = {}

    def client_scale(self, rank: int) -> float:
        return S.lora_scale(self.alpha, rank, self.rslora)

    def factors_for_rank(self, rank: int) -> LoRAState:
        """What a rank-``rank`` client starts from: the truncated global update, or before
        any aggregation a fresh LoRA (shared by all clients of that rank)."""
        if not self.svd:
            return S.init_factors(self.shapes, rank, torch_generator(self.seed, "flexlora-init", rank))
        scale = self.client_scale(rank)
        return {n: d.truncate(rank, scale, self.split) for n, d in self.svd.items()}

    def configure(self, rnd: int, clients: Sequence[ClientSpec]) -> dict[int, ClientTask]:
        by_rank: dict[int, LoRAState] = {}
        tasks: dict[int, ClientTask] = {}
        self._scales = {}
        for c in clients:
            if c.budget not in by_rank:  # one truncation per distinct rank
                by_rank[c.budget] = self.factors_for_rank(c.budget)
            self._scales[c.cid] = self.client_scale(c.budget)
            tasks[c.cid] = ClientTask(factors=S.clone(by_rank[c.budget]), scale=self._scales[c.cid])
        return tasks

    def aggregate(self, rnd: int, updates: Mapping[int, ClientUpdate]) -> dict[str, float]:
        if not updates:
            return {}
        cids, p = S.round_weights(updates)
        weights = [w * self._scales[c] for w, c in zip(p, cids)]  # fold each client's scale in
        for name in self.shapes:
            B, A = stack([updates[c].factors[name] for c in cids], weights)
            self.svd[name] = svd_of_product(B, A)
        return {"stacked_rank": float(B.shape[1])}

    def global_task(self) -> ClientTask:
        """``W0 + ΔW`` as factors of the full stacked rank with scale 1."""
        if not self.svd:
            return ClientTask(factors=self.factors_for_rank(1), scale=0.0)
        return ClientTask(factors={n: d.truncate(d.S.numel(), 1.0, "balanced")
                                   for n, d in self.svd.items()}, scale=1.0)

    def state_dict(self) -> dict:
        return {"svd": {n: (d.U.clone(), d.S.clone(), d.Vh.clone()) for n, d in self.svd.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.svd = {n: SVD(U.clone(), S_.clone(), Vh.clone()) for n, (U, S_, Vh) in sd["svd"].items()}


