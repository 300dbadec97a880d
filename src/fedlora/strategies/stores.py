"""The two shapes of global state that several methods keep, written once.

Mixins of storage only (a global task and a checkpoint); each method's own round logic
(``configure``/``aggregate``) stays in its file, and no strategy inherits from another.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..seeding import torch_generator
from ..state import clone, from_plain, init_factors, lora_scale, to_plain
from ..types import ClientSpec, ClientTask, Factors, LoRAState


class OnePair:
    """The whole global state is one LoRA pair at one scale (FedIT, the full-rank reference,
    HetLoRA, FFA-LoRA, Fed-PLoRA)."""

    factors: LoRAState
    scale: float
    freeze_A: bool = False

    def global_task(self) -> ClientTask:
        return ClientTask(factors=clone(self.factors), scale=self.scale, freeze_A=self.freeze_A)

    def state_dict(self) -> dict:
        return {"factors": to_plain(self.factors)}

    def load_state_dict(self, sd: dict) -> None:
        self.factors = from_plain(sd["factors"])


class MergedBase:
    """The global state is a cumulative low-rank delta merged into the frozen base, and every
    client starts each round from a fresh LoRA of its own rank on top of it (FLoRA, FLoRIST).

    The fresh ``A`` is seeded per (seed, ``self.name``, round, client), ``B = 0``, and the
    client's scale follows from its rank.
    """

    name: str
    shapes: dict[str, tuple[int, int]]
    alpha: float
    rslora: bool
    seed: int
    delta: LoRAState  # per module, scale folded into B

    def configure(self, rnd: int, clients: Sequence[ClientSpec]) -> dict[int, ClientTask]:
        return {c.cid: ClientTask(factors=init_factors(self.shapes, c.budget,
                                                       torch_generator(self.seed, self.name, rnd, c.cid)),
                                  scale=lora_scale(self.alpha, c.budget, self.rslora), base_delta=clone(self.delta))
                for c in clients}

    def global_task(self) -> ClientTask:
        empty = {n: Factors(A=torch.zeros(0, i), B=torch.zeros(o, 0)) for n, (o, i) in self.shapes.items()}
        return ClientTask(factors=empty, scale=1.0, base_delta=clone(self.delta))

    def state_dict(self) -> dict:
        return {"delta": to_plain(self.delta)}

    def load_state_dict(self, sd: dict) -> None:
        self.delta = from_plain(sd["delta"])
