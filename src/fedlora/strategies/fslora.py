"""FSLoRA: Federated Sketching LoRA, a random rank sub-block per client per round (arXiv 2501.19389).

Fang et al. The server keeps one rank-``r`` pair per module. Each round, client ``i``
trains the sub-block picked by a fresh uniform index set ``I`` of size ``k_i`` (its
budget), with scale ``s * r / k_i``, which is exact gradient descent on
``W0 + s * B S A`` with the diagonal sketch ``S = (r / k_i) * 1_I``. The server scatters
each client's increments back to rank ``r`` and takes their weighted mean (coordinates a
client did not sample contribute zero: the unbiased update of the paper).

``fslora-u`` (``exact_start``): the same draw, upload and aggregate, but each client starts from
the global model exactly: it trains its block at the global scale ``s`` (no ``r / k_i``
amplification) with the unsampled slots folded into its frozen weights as a low-rank side
path. The sketch then no longer changes the function a client trains, so the averaged
increments descend the true objective, whose minimiser has no sketch shrinkage
(docs/rank_recovery.md); the price is the fold's download, ``(r − k_i)(m + n)`` more a round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import check
from ..methods import BuildContext, Method, first_line
from ..server_opt import ServerOptimizer, ServerOptimizerKind
from ..sketch import sketch_indices
from ..state import (
    clone,
    fold_rest,
    from_plain,
    init_factors,
    lora_scale,
    round_weights,
    scatter_add_,
    subtract,
    take,
    to_plain,
)
from ..types import ClientSpec, ClientTask, ClientUpdate, Factors, LoRAState


class FSLoRA:
    name = "fslora"

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        global_rank: int,
        alpha: float,
        seed: int,
        rslora: bool = False,
        server_optimizer: ServerOptimizer | None = None,
        exact_start: bool = False,
    ) -> None:
        self.rank = global_rank
        self.exact_start = exact_start
        self.name = "fslora-u" if exact_start else "fslora"
        self.scale = lora_scale(alpha, global_rank, rslora)
        self.seed = seed
        self.factors: LoRAState = init_factors(shapes, global_rank, torch.Generator().manual_seed(seed))
        self.optimizer = server_optimizer or ServerOptimizer("sgd", 1.0)
        self._sent: dict[int, Tensor] = {}  # cid -> index set of the round in flight

    def configure(self, rnd: int, clients: Sequence[ClientSpec]) -> dict[int, ClientTask]:
        self._sent = {}
        tasks: dict[int, ClientTask] = {}
        for c in clients:
            k = min(c.budget, self.rank)
            idx = sketch_indices(self.seed, rnd, c.cid, self.rank, k)
            self._sent[c.cid] = idx
            if self.exact_start:
                tasks[c.cid] = ClientTask(factors=take(self.factors, idx), scale=self.scale,
                                          base_delta=fold_rest(self.factors, idx, self.rank, self.scale),
                                          config={"sketch_ratio": k / self.rank})
            else:
                tasks[c.cid] = ClientTask(factors=take(self.factors, idx), scale=self.scale * self.rank / k,
                                          config={"sketch_ratio": k / self.rank}, effect_scale=self.scale)
        return tasks

    def aggregate(self, rnd: int, updates: Mapping[int, ClientUpdate]) -> dict[str, float]:
        if not updates:
            return {}
        cids, weights = round_weights(updates)
        unknown = [c for c in cids if c not in self._sent]
        if unknown:
            raise ValueError(f"updates from clients that got no task this round: {unknown}")
        # sum_i p_i * scatter(increment_i), accumulated client by client: memory O(r (m + n))
        # and work O(k_i (m + n)) per client, whatever the number of clients
        mean_delta = {n: Factors(A=torch.zeros_like(f.A), B=torch.zeros_like(f.B))
                      for n, f in self.factors.items()}
        for c, w in zip(cids, weights):
            idx = self._sent[c]
            scatter_add_(mean_delta, subtract(updates[c].factors, take(self.factors, idx)), idx, w)
        self.optimizer.step_(self.factors, mean_delta)
        coverage = torch.zeros(self.rank, dtype=torch.bool)
        for c in cids:
            coverage[self._sent[c]] = True
        return {"rank_coverage": coverage.float().mean().item()}

    def perturb_(self, std: float, generator: torch.Generator) -> None:
        """Add N(0, std²) to every global coordinate (DP noise on the round's mean increment;
        with a server learning rate the noise is scaled like the increment it rides on)."""
        if self.optimizer.kind != "sgd":
            raise ValueError(f"DP noise needs [strategy.{self.name}] server_optimizer = 'sgd'")
        for name in sorted(self.factors):
            f = self.factors[name]
            f.A.add_(torch.randn(f.A.shape, generator=generator, dtype=f.A.dtype), alpha=std * self.optimizer.lr)
            f.B.add_(torch.randn(f.B.shape, generator=generator, dtype=f.B.dtype), alpha=std * self.optimizer.lr)

    def global_task(self) -> ClientTask:
        return ClientTask(factors=clone(self.factors), scale=self.scale)

    def state_dict(self) -> dict:
        return {"factors": to_plain(self.factors), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.factors = from_plain(sd["factors"])
        self.optimizer.load_state_dict(sd["optimizer"])


@dataclass
class FSLoRASettings:
    """``[strategy.fslora]``: the server's update of the global pair."""

    # sgd with server_lr = 1 is plain averaging; adamw: torch.optim.AdamW defaults (the authors' server)
    server_optimizer: ServerOptimizerKind = "sgd"
    server_lr: float = 1.0
    section: ClassVar[str] = "strategy.fslora"

    def validate(self) -> None:
        check(f"{self.section}.server_lr", self.server_lr > 0, "must be positive")


@dataclass
class FSLoRAUSettings(FSLoRASettings):
    """``[strategy.fslora-u]``: the server's update of the global pair (same keys as fslora's)."""

    section: ClassVar[str] = "strategy.fslora-u"


def _builder(exact_start: bool) -> Callable[[BuildContext], FSLoRA]:
    def build(c: BuildContext) -> FSLoRA:
        s: FSLoRASettings = c.settings
        return FSLoRA(c.shapes, c.global_rank, c.alpha, c.seed, c.rslora,
                      ServerOptimizer(s.server_optimizer, s.server_lr), exact_start)
    return build


def _dp_blocker(s: FSLoRASettings) -> str | None:
    return None if s.server_optimizer == "sgd" else f"DP noise needs [{s.section}] server_optimizer = \"sgd\""


METHOD = Method("fslora", _builder(False), first_line(__doc__), settings=FSLoRASettings, dp_blocker=_dp_blocker,
                one_pair=True)
UNBIASED = Method("fslora-u", _builder(True),
                  "FSLoRA from the exact global model: the sampled block at the global scale, the rest folded "
                  "into the client's frozen weights (no sketch shrinkage)",
                  settings=FSLoRAUSettings, dp_blocker=_dp_blocker, one_pair=True)
