"""Server optimisers (FedOpt style): the round's mean increment is a pseudo-gradient.

``sgd`` with ``lr=1`` is plain averaging (the update FSLoRA's paper analyses).
``adamw`` is ``torch.optim.AdamW`` with its defaults (β = (0.9, 0.999), eps 1e-8,
decoupled weight decay 0.01 on the parameters), the server optimiser of the FSLoRA
authors' code. ``adam`` is this project's earlier variant: Adam with β = (0.9, 0.99) and
no weight decay; it is not what the authors run, and is kept so earlier results reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from .types import LoRAState

ServerOptimizerKind = Literal["sgd", "adam", "adamw"]
# (betas, weight decay) of each Adam kind when not given
DEFAULTS: dict[str, tuple[tuple[float, float], float]] = {"adam": ((0.9, 0.99), 0.0),
                                                           "adamw": ((0.9, 0.999), 0.01)}


@dataclass
class ServerOptimizer:
    kind: ServerOptimizerKind = "sgd"
    lr: float = 1.0
    betas: tuple[float, float] | None = None  # None: the kind's default
    eps: float = 1e-8
    weight_decay: float | None = None  # decoupled (AdamW); None: the kind's default
    step_count: int = 0
    moments: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in get_args(ServerOptimizerKind):
            raise ValueError(f"server optimizer must be one of {get_args(ServerOptimizerKind)}, got {self.kind!r}")
        betas, decay = DEFAULTS.get(self.kind, ((0.9, 0.99), 0.0))
        self.betas = betas if self.betas is None else self.betas
        self.weight_decay = decay if self.weight_decay is None else self.weight_decay
        if self.weight_decay and self.kind != "adamw":
            raise ValueError(f"weight decay needs server optimizer 'adamw', not {self.kind!r}")

    def step_(self, params: LoRAState, mean_delta: LoRAState) -> None:
        """Move ``params`` in place along the round's mean increment ``mean_delta``."""
        self.step_count += 1
        for name, f in params.items():
            d = mean_delta[name]
            if self.weight_decay:  # decoupled: shrink the parameters, not the pseudo-gradient
                f.A.mul_(1 - self.lr * self.weight_decay)
                f.B.mul_(1 - self.lr * self.weight_decay)
            f.A.add_(self._direction(f"{name}.A", d.A))
            f.B.add_(self._direction(f"{name}.B", d.B))

    def _direction(self, key: str, delta: Tensor) -> Tensor:
        if self.kind == "sgd":
            return self.lr * delta
        b1, b2 = self.betas
        m, v = self.moments.get(key, (torch.zeros_like(delta), torch.zeros_like(delta)))
        m.mul_(b1).add_(delta, alpha=1 - b1)  # the pseudo-gradient is -delta; signs cancel
        v.mul_(b2).addcmul_(delta, delta, value=1 - b2)
        self.moments[key] = (m, v)
        m_hat = m / (1 - b1**self.step_count)
        v_hat = v / (1 - b2**self.step_count)
        return self.lr * m_hat / (v_hat.sqrt() + self.eps)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "lr": self.lr, "step_count": self.step_count,
                "moments": {k: {"m": m.clone(), "v": v.clone()} for k, (m, v) in self.moments.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.step_count = sd["step_count"]
        self.moments = {k: (mv["m"].clone(), mv["v"].clone()) for k, mv in sd["moments"].items()}
