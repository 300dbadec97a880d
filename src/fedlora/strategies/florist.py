"""FLoRIST: stacked-factor SVD with a singular-value energy threshold, merged into the base (arXiv 2506.09199).

Each round every client trains a fresh LoRA of its own rank ``k_i`` on the merged base, as in
FLoRA (``A`` seeded per (seed, round, client), ``B = 0``, scale ``s_i`` from its own rank).
The server decomposes ``ΔW = Σ p_i s_i B_i A_i`` from the stacked factors
``[p_1 s_1 B_1, …] · [A_1; …]`` (:mod:`fedlora.lowrank`; no ``m × n`` matrix while
``Σ k_i < min(m, n)``), keeps per module the smallest rank ``p_t`` whose energy
``Σ_{j≤p_t} σ_j² / Σ_j σ_j²`` reaches ``energy`` (τ), and merges that rank-``p_t`` pair
into the frozen base delta every task carries (cumulative, re-factored exactly past
``min(m, n)``). At τ = 1 this is FLoRA's exact sum; at τ < 1 it is the best rank-``p_t``
approximation, and what is cut is lost for good (no error feedback, as in the paper).

Read in the authors' code, except [I]: ``p_i s_i`` folded into the stack (their runs all
have ``s_i = 2`` and merge with the last client's scale); at τ = 1 every nonzero
component is kept; zero energy merges nothing (their code divides by zero); ``p_t`` is not
capped (``≤ min(Σ k_i, m, n)``); the download is the whole cumulative delta, so a client
that missed rounds still starts from the current base.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import check
from ..lowrank import add_to_delta, energy_rank, stack, svd_of_product
from ..methods import BuildContext, Method, first_line
from ..state import lora_scale, round_weights
from ..types import ClientUpdate, LoRAState
from .stores import MergedBase


class FLoRIST(MergedBase):
    name = "florist"

    def __init__(self, shapes: Mapping[str, tuple[int, int]], alpha: float, seed: int,
                 rslora: bool = False, energy: float = 0.9) -> None:
        self.shapes = dict(shapes)
        self.alpha, self.rslora, self.seed, self.energy = alpha, rslora, seed, energy
        self.delta: LoRAState = {}  # cumulative merged update per module (scale folded in)

    def aggregate(self, rnd: int, updates: Mapping[int, ClientUpdate]) -> dict[str, float]:
        if not updates:
            return {}
        cids, p = round_weights(updates)
        kept: list[int] = []
        for name in self.shapes:
            parts = [updates[c].factors[name] for c in cids]
            # s_i follows from the rank the client trained: no memory of the tasks needed
            weights = [w * lora_scale(self.alpha, f.rank, self.rslora) for w, f in zip(p, parts)]
            svd = svd_of_product(*stack(parts, weights))  # the exact SVD of Σ p_i s_i B_i A_i
            kept.append(energy_rank(svd.S, self.energy))
            if kept[-1]:
                self.delta[name] = add_to_delta(self.delta.get(name), [svd.truncate(kept[-1])], [1.0])
        ranks = [f.rank for f in self.delta.values()] or [0]
        return {"kept_rank": sum(kept) / len(kept), "delta_rank": sum(ranks) / len(ranks)}



@dataclass
class FLoRISTSettings:
    """``[strategy.florist]``: how much of each round's aggregate is merged."""

    energy: float = 0.9  # τ in (0, 1]: share of Σ σ² kept; 1 keeps every nonzero component (exact)

    def validate(self) -> None:
        check("strategy.florist.energy", 0 < self.energy <= 1, "must be in (0, 1]")


def _build(c: BuildContext) -> FLoRIST:
    s: FLoRISTSettings = c.settings
    s.validate()
    return FLoRIST(c.shapes, c.alpha, c.seed, c.rslora, s.energy)


METHOD = Method("florist", _build, first_line(__doc__), settings=FLoRISTSettings,
                exact=lambda s: s.energy >= 1.0, averages="product")  # at full energy the merge is the exact sum
