"""FedEx-LoRA: FedAvg on the factors plus the exact residual folded into the base (arXiv 2410.09432).

Singhal et al., ACL 2025. One rank for every client, the smallest budget (as FedIT), so every
device can take part: the method has no heterogeneous ranks. Clients train the global pair
at scale ``s = lora_scale(alpha, r)``; the server averages ``A`` and ``B`` separately
(``B̄ = Σ p_i B_i``, ``Ā = Σ p_i A_i``) and adds the residual ``s (Σ p_i B_i A_i − B̄ Ā)`` to
a cumulative frozen base delta that every task carries, so
``W_new + s B̄ Ā = Σ p_i (W_old + s B_i A_i)``: the exact FedAvg of the clients' effective
weights. Because ``Σ p_i (B_i − B̄) = 0``, the residual
``Σ p_i (B_i − B̄)(A_i − Ā) = Σ_{i>1} p_i (B_i − B̄)(A_i − A_1)`` is stacked exactly as
``(K − 1) r`` columns, without an SVD or an ``m × n`` matrix; the delta is re-factored
exactly once its rank reaches ``min(m, n)`` (:func:`fedlora.lowrank.add_to_delta`).
Download: the pair and the delta; upload: the pair.

From the authors' code, except [I] (the paper's body was unreadable): data-size weights
``p_i`` (the code's are uniform: ``strategy.weighting = "uniform"``); the residual sent as
low-rank factors (the code ships the dense base); ``(K − 1) r`` columns via the identity above.
Not copied: the code adds the transposed residual to the base weight, right for GPT-2's
``Conv1D`` (in × out) but silently wrong for ``nn.Linear`` (out × in); here the delta is
``B_d A_d`` of the layer's own ``(out, in)`` shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..lowrank import add_to_delta
from ..methods import Method, always, first_line
from ..seeding import torch_generator
from ..state import clone, from_plain, init_factors, lora_scale, round_weights, to_plain, weighted_sum
from ..types import ClientSpec, ClientTask, ClientUpdate, Factors, LoRAState


class FedExLoRA:
    name = "fedex"

    def __init__(self, shapes: Mapping[str, tuple[int, int]], budgets: Sequence[int], alpha: float,
                 seed: int, rslora: bool = False) -> None:
        self.rank = min(budgets)
        self.scale = lora_scale(alpha, self.rank, rslora)
        self.factors: LoRAState = init_factors(shapes, self.rank, torch_generator(seed, "fedex-init"))
        self.delta: LoRAState = {}  # cumulative residual per module (scale folded in)

    def configure(self, rnd: int, clients: Sequence[ClientSpec]) -> dict[int, ClientTask]:
        return {c.cid: ClientTask(factors=clone(self.factors), scale=self.scale, base_delta=clone(self.delta))
                for c in clients}

    def aggregate(self, rnd: int, updates: Mapping[int, ClientUpdate]) -> dict[str, float]:
        if not updates:
            return {}
        cids, p = round_weights(updates)
        ups = [updates[c].factors for c in cids]
        mean = weighted_sum(ups, p)
        if len(ups) > 1:  # one client: no residual
            for name, m in mean.items():
                ref = ups[0][name].A  # any fixed A_ref: Σ p_i (B_i − B̄) A_ref = 0
                parts = [Factors(A=u[name].A - ref, B=u[name].B - m.B) for u in ups[1:]]
                self.delta[name] = add_to_delta(self.delta.get(name), parts, [w * self.scale for w in p[1:]])
        self.factors = mean
        ranks = [f.rank for f in self.delta.values()] or [0]
        return {"delta_rank": sum(ranks) / len(ranks)}

    def global_task(self) -> ClientTask:
        return ClientTask(factors=clone(self.factors), scale=self.scale, base_delta=clone(self.delta))

    def state_dict(self) -> dict:
        return {"factors": to_plain(self.factors), "delta": to_plain(self.delta)}

    def load_state_dict(self, sd: dict) -> None:
        self.factors, self.delta = from_plain(sd["factors"]), from_plain(sd["delta"])


METHOD = Method("fedex", lambda c: FedExLoRA(c.shapes, c.budgets, c.alpha, c.seed, c.rslora), first_line(__doc__),
                exact=always, one_pair=True, averages="product")  # the delta starts empty
