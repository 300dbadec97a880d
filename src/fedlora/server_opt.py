"""Server optimisers (FedOpt style): the round's mean increment is a pseudo-gradient.

``sgd`` with ``lr=1`` is plain averaging (the update FSLoRA's paper analyses);
``adam`` is the named variant the FSLoRA authors' code uses on the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from .types import LoRAState

ServerOptimizerKind = Literal["sgd", "adam"]


@dataclass
class ServerOptimizer:
    kind: ServerOptimizerKind = "sgd"
    lr: float = 1.0
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    step_count: int = 0
    moments: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in get_args(ServerOptimizerKind):
            raise ValueError(f"server optimizer must be one of {get_args(ServerOptimizerKind)}, got {self.kind!r}")

    def step_(self, params: LoRAState, mean_delta: LoRAState) -> None:
        """Move ``params`` in place along the round's mean increment ``mean_delta``."""
        self.step_count += 1
        for name, f in params.items():
            d = mean_delta[name]
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
                "moments": {k: (m.clone(), v.clone()) for k, (m, v) in self.moments.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.step_count = sd["step_count"]
        self.moments = {k: (m.clone(), v.clone()) for k, (m, v) in sd["moments"].items()}
