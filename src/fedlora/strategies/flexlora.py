"""FlexLoRA: per-client ranks, best rank-r_i fit of the averaged update (arXiv 2402.11505).

Bai et al., NeurIPS 2024. Client ``i`` trains its own rank ``r_i`` (its budget) with
its own scale ``s_i = lora_scale(alpha, r_i)``. The server forms
``ΔW = Σ p_i s_i B_i A_i`` only implicitly: it decomposes the stacked factors
(:mod:`fedlora.lowrank`) once per layer per round, keeps that SVD (enough to serve any
rank, including clients sampled later), and truncates once per distinct rank.
Nothing is merged into ``W0``; the global model is ``W0 + ΔW``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..lowrank import SVD, SigmaSplit, stack, svd_of_product
from ..methods import Method, always, first_line
from ..seeding import torch_generator
from ..state import clone, init_factors, lora_scale, round_weights
from ..types import ClientSpec, ClientTask, ClientUpdate, LoRAState


class FlexLoRA:
    name = "flexlora"

    def __init__(self, shapes: Mapping[str, tuple[int, int]], alpha: float, seed: int,
                 rslora: bool = False, sigma_split: SigmaSplit = "balanced") -> None:
        self.shapes = dict(shapes)
        self.alpha, self.rslora, self.seed, self.split = alpha, rslora, seed, sigma_split
        self.svd: dict[str, SVD] = {}  # the latest ΔW per module; empty before round 1

    def client_scale(self, rank: int) -> float:
        return lora_scale(self.alpha, rank, self.rslora)

    def factors_for_rank(self, rank: int) -> LoRAState:
        """What a rank-``rank`` client starts from: the truncated global update, or before
        any aggregation a fresh seeded LoRA (shared by all clients of that rank)."""
        if not self.svd:
            return init_factors(self.shapes, rank, torch_generator(self.seed, "flexlora-init", rank))
        scale = self.client_scale(rank)
        return {n: d.truncate(rank, scale, self.split) for n, d in self.svd.items()}

    def configure(self, rnd: int, clients: Sequence[ClientSpec]) -> dict[int, ClientTask]:
        by_rank: dict[int, LoRAState] = {}
        tasks: dict[int, ClientTask] = {}
        for c in clients:
            if c.budget not in by_rank:  # one truncation per distinct rank, not per client
                by_rank[c.budget] = self.factors_for_rank(c.budget)
            tasks[c.cid] = ClientTask(factors=clone(by_rank[c.budget]), scale=self.client_scale(c.budget))
        return tasks

    def aggregate(self, rnd: int, updates: Mapping[int, ClientUpdate]) -> dict[str, float]:
        if not updates:
            return {}
        cids, p = round_weights(updates)
        stacked = 0
        for name in self.shapes:
            parts = [updates[c].factors[name] for c in cids]
            # s_i follows from the rank the client trained (a structural fact of its upload),
            # so aggregation needs no memory of the tasks and survives a resume mid-round.
            weights = [w * self.client_scale(f.rank) for w, f in zip(p, parts)]
            B, A = stack(parts, weights)
            self.svd[name] = svd_of_product(B, A)
            stacked = B.shape[1]
        return {"stacked_rank": float(stacked)}

    def global_task(self) -> ClientTask:
        """``W0 + ΔW`` as factors of the full decomposed rank, ``Σ`` folded in, scale 1."""
        if not self.svd:
            return ClientTask(factors=self.factors_for_rank(1), scale=0.0)  # ΔW = 0
        return ClientTask(factors={n: d.truncate(d.S.numel(), 1.0, "balanced")
                                   for n, d in self.svd.items()}, scale=1.0)

    def state_dict(self) -> dict:
        return {"svd": {n: {"U": d.U.clone(), "S": d.S.clone(), "Vh": d.Vh.clone()} for n, d in self.svd.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.svd = {n: SVD(d["U"].clone(), d["S"].clone(), d["Vh"].clone()) for n, d in sd["svd"].items()}


@dataclass
class FlexLoRASettings:
    """``[strategy.flexlora]``: how each client's rank-r_i pair is cut from the SVD."""

    sigma_split: SigmaSplit = "balanced"  # sqrt(Σ) into each factor, or all of Σ into B


METHOD = Method("flexlora", lambda c: FlexLoRA(c.shapes, c.alpha, c.seed, c.rslora, c.settings.sigma_split),
                first_line(__doc__), settings=FlexLoRASettings, exact=always,
                averages="product")  # the SVD is kept whole
