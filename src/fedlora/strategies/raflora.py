"""raFLoRA: rank-partitioned aggregation against rank collapse under SVD allocation (arXiv 2602.13486).

The global update ``ΔW`` is held as its rank-``r_max`` SVD (``r_max`` = the largest budget).
Client ``i`` starts from its top-``k_i`` components, as in FlexLoRA (scale
``s_i = lora_scale(alpha, k_i)``, ``sqrt(σ)`` in each factor), trains, and uploads its full
factors. Rank column ``j`` is global direction ``j`` for every client, so the ranks split
into partitions ``[b_{l-1}, b_l)`` at the sorted distinct budgets ``b_1 < … < b_L`` of all
clients. Partition ``l`` is averaged over the round's clients that trained it,
``C_l = {i : k_i ≥ b_l}``, with weights ``p_i / c_l``, ``c_l = Σ_{C_l} p_i``:
``ΔW_l = Σ_{C_l} (p_i / c_l) s_i B_i[:, l] A_i[l, :]``. FlexLoRA's ``Σ p_i s_i B_i A_i`` is
``Σ_l c_l ΔW_l`` and shrinks partition ``l`` by ``c_l < 1`` every round (the "rank
collapse"); raFLoRA removes that factor. ``ΔW ← Σ_l ΔW_l``, decomposed from the stacked
blocks (:mod:`fedlora.lowrank`, no ``m × n`` matrix while the stack is thin) and truncated
to ``r_max``. Equal budgets: one partition, ``c = 1``, exactly FlexLoRA's aggregate.

Only the abstract was readable; all else is [I] (some matching an unofficial
reimplementation [T]): FlexLoRA's scale and balanced σ split; boundaries from every
client's budget, not only the round's; a partition no returning client trained keeps its
previous block (the [T] code drops it, erasing that part of the global update); round 1
starts from one seeded rank-``r_max`` ``A`` whose leading rows each client takes (``B = 0``),
so partitions align from the start; the global model is the rank-``r_max`` truncation; a
budget that is no boundary (a client unknown at build) trains the largest boundary below it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..lowrank import SVD, stack, svd_of_product
from ..methods import Method, first_line
from ..seeding import torch_generator
from ..state import clone, init_factors, lora_scale, round_weights, truncate_rank
from ..types import ClientSpec, ClientTask, ClientUpdate, Factors, LoRAState


def partitions(ranks: Sequence[int], p: Sequence[float], bounds: Sequence[int]
               ) -> list[tuple[int, int, dict[int, float]]]:
    """Per partition ``[lo, hi)``: {position of a client that trained it: ``p_i / c_l``} (empty
    when none did). ``ranks[i]``, ``p[i]``: the round's clients; ``bounds``: ``b_1 < … < b_L``."""
    edges = [0, *bounds]
    out = []
    for lo, hi in zip(edges, edges[1:]):
        members = [i for i, k in enumerate(ranks) if k >= hi]
        c = sum(p[i] for i in members)
        out.append((lo, hi, {i: p[i] / c for i in members}))
    return out


class RaFLoRA:
    name = "raflora"

    def __init__(self, shapes: Mapping[str, tuple[int, int]], budgets: Sequence[int], alpha: float,
                 seed: int, rslora: bool = False) -> None:
        self.shapes = dict(shapes)
        self.bounds = sorted(set(budgets))  # b_1 < … < b_L; b_0 = 0
        self.rank = self.bounds[-1]  # r_max
        self.alpha, self.rslora = alpha, rslora
        self.init = init_factors(shapes, self.rank, torch_generator(seed, "raflora-init"))
        self.svd: dict[str, SVD] = {}  # ΔW per module, rank <= r_max; empty before round 1

    def client_scale(self, rank: int) -> float:
        return lora_scale(self.alpha, rank, self.rslora)

    def trained_rank(self, budget: int) -> int:
        """The largest rank level (boundary) a client of this budget can train."""
        fits = [b for b in self.bounds if b <= budget]
        if not fits:
            raise ValueError(f"budget {budget} is below the smallest rank level {self.bounds[0]}")
        return fits[-1]

    def factors_for_rank(self, rank: int) -> LoRAState:
        if not self.svd:  # the leading rows of the one seeded A, B = 0
            return truncate_rank(self.init, rank)
        return {n: d.truncate(rank, self.client_scale(rank)) for n, d in self.svd.items()}

    def configure(self, rnd: int, clients: Sequence[ClientSpec]) -> dict[int, ClientTask]:
        by_rank: dict[int, LoRAState] = {}
        tasks: dict[int, ClientTask] = {}
        for c in clients:
            k = self.trained_rank(c.budget)
            if k not in by_rank:  # one truncation per distinct rank, not per client
                by_rank[k] = self.factors_for_rank(k)
            tasks[c.cid] = ClientTask(factors=clone(by_rank[k]), scale=self.client_scale(k))
        return tasks

    def aggregate(self, rnd: int, updates: Mapping[int, ClientUpdate]) -> dict[str, float]:
        if not updates:
            return {}
        cids, p = round_weights(updates)
        # the rank a client trained is a structural fact of its upload: no memory of the tasks
        ranks = [next(iter(updates[c].factors.values())).rank for c in cids]
        if any(k not in self.bounds for k in ranks):
            raise ValueError(f"uploaded ranks {sorted(set(ranks))} must be rank levels {self.bounds}")
        parts_of = partitions(ranks, p, self.bounds)
        for name in self.shapes:
            parts: list[Factors] = []
            weights: list[float] = []
            for lo, hi, members in parts_of:
                for i, w in members.items():
                    f = updates[cids[i]].factors[name]
                    parts.append(Factors(A=f.A[lo:hi], B=f.B[:, lo:hi]))
                    weights.append(w * self.client_scale(ranks[i]))
                if not members and name in self.svd:  # nobody trained it: keep the previous block
                    d = self.svd[name]
                    parts.append(Factors(A=d.Vh[lo:hi], B=d.U[:, lo:hi] * d.S[lo:hi]))
                    weights.append(1.0)
            d = svd_of_product(*stack(parts, weights))
            self.svd[name] = SVD(d.U[:, :self.rank], d.S[:self.rank], d.Vh[:self.rank])
        return {"covered_partitions": sum(bool(m) for _, _, m in parts_of) / len(parts_of)}

    def global_task(self) -> ClientTask:
        """``W0 + ΔW`` as factors of ``ΔW``'s rank, ``Σ`` folded in, scale 1."""
        if not self.svd:
            return ClientTask(factors=clone(self.init), scale=self.client_scale(self.rank))  # B = 0
        return ClientTask(factors={n: d.truncate(d.S.numel()) for n, d in self.svd.items()}, scale=1.0)

    def state_dict(self) -> dict:
        return {"svd": {n: {"U": d.U.clone(), "S": d.S.clone(), "Vh": d.Vh.clone()} for n, d in self.svd.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.svd = {n: SVD(d["U"].clone(), d["S"].clone(), d["Vh"].clone()) for n, d in sd["svd"].items()}


def unservable(built: Sequence[int], served: Sequence[int]) -> str | None:
    """Budgets below the smallest rank level (the smallest budget built for) train no partition."""
    low = sorted({b for b in served if b < min(built)})
    return (f"raflora cannot serve budgets {low}: below its smallest rank level {min(built)} "
            f"(its levels are the budgets it was built for, {sorted(set(built))})") if low else None


METHOD = Method("raflora", lambda c: RaFLoRA(c.shapes, c.budgets, c.alpha, c.seed, c.rslora), first_line(__doc__),
                budget_blocker=unservable, averages="product")
