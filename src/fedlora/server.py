"""The server's round logic around a strategy: sampling, screening, bounding, the head, DP.

Both carriers (the in-process simulator and the Flower ServerApp) drive this object,
so a round means the same thing on one machine and across many.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .clipping import AdaptiveClip, bound_updates, effect_norm, update_norm
from .config import PrivacyConfig
from .diagnostics import round_diagnostics, sample_modules
from .methods import averages
from .privacy import DPMechanism
from .seeding import numpy_rng
from .state import example_weights, weighted_sum_tensors
from .types import ClientSpec, ClientTask, ClientUpdate, Strategy, payload_nbytes
from .validate import decode_updates, screen_updates

log = logging.getLogger("fedlora.server")

# Under DP, metrics.jsonl holds only these (public: counts and bytes of the round's traffic,
# and the privacy spent) besides the evaluation on the server's own data: a client-derived
# value (train_loss, fidelity, clip norms, a strategy's coverage) would be released un-noised.
DP_RELEASED = frozenset({"clients", "bytes_down", "bytes_up", "rejected", "dropped", "skipped", "dp_epsilon"})


def sample_clients(num_clients: int, per_round: int, seed: int, rnd: int) -> list[int]:
    """``per_round`` distinct client ids for round ``rnd``, sorted; all when per_round >= n."""
    if per_round >= num_clients:
        return list(range(num_clients))
    return sorted(numpy_rng(seed, "sample", rnd).choice(num_clients, per_round, replace=False).tolist())


class FederatedServer:
    """A strategy plus what every method shares: sampling, screening and bounding of updates,
    head averaging, traffic counts, fidelity diagnostics and differential privacy.

    ``per_round``: clients sampled per round (default: all of them; with DP, the expected
    number of a Poisson sample).
    """

    def __init__(self, strategy: Strategy, head: Mapping[str, Tensor], budgets: Sequence[int],
                 num_examples: Sequence[int], fingerprint: str = "", min_clients: int = 1,
                 privacy: PrivacyConfig | None = None, seed: int = 0,
                 per_round: int | None = None, weighting: str = "examples") -> None:
        self.strategy = strategy
        self.head = {k: v.detach().clone() for k, v in head.items()}
        self.budgets = list(budgets)
        self.num_examples = list(num_examples)
        self.fingerprint = fingerprint
        self.min_clients = min_clients
        self.privacy = p = privacy or PrivacyConfig()
        self.seed = seed
        self.per_round = per_round or len(self.budgets)
        self.weighting = weighting  # "examples" (p_i ∝ n_i) or "uniform" (p_i = 1/N)
        self.adaptive = AdaptiveClip(p.clip_init, p.clip_quantile, p.clip_lr) if p.clip_norm == "auto" else None
        self.factors = averages(strategy) == "factors"  # bound the quantity the method averages
        self.measure = effect_norm if self.factors else update_norm
        self.dp = DPMechanism(p, len(self.budgets), self.per_round, seed) if p.noise_multiplier > 0 else None

    def sample(self, rnd: int) -> list[int]:
        """The clients of round ``rnd``: a seeded fixed-size sample, or under DP a Poisson sample."""
        if self.dp is not None:
            return self.dp.sample(rnd)
        return sample_clients(len(self.budgets), self.per_round, self.seed, rnd)

    def spec(self, cid: int) -> ClientSpec:
        return ClientSpec(cid=cid, budget=self.budgets[cid], num_examples=self.num_examples[cid])

    def configure(self, rnd: int, cids: Sequence[int], nonce: bool = False) -> dict[int, ClientTask]:
        """One task per client; with ``nonce``, each carries a fresh random nonce (from OS
        entropy, not the seed) that its update must return (carriers over a wire ask for it)."""
        tasks = self.strategy.configure(rnd, [self.spec(c) for c in cids])
        for task in tasks.values():
            task.head = {k: v.clone() for k, v in self.head.items()}
            task.fingerprint = self.fingerprint
            task.nonce = secrets.token_hex(16) if nonce else ""
        return tasks

    def aggregate(self, rnd: int, tasks: Mapping[int, ClientTask],
                  updates: Mapping[int, Any] | Iterable[tuple[int, Any]],
                  decode: Callable[[Any, ClientTask], ClientUpdate] | None = None) -> dict[str, float]:
        """Screen, clip and fold the round's updates into the global state.

        ``updates`` may hold several answers of one client (as a list of pairs): such a
        client is rejected. With ``decode``, they are raw replies, decoded here as answers
        to their tasks; one that does not decode is rejected like any bad update. Each
        valid update weighs by the server's example count for its client, never by the
        count it declares (which must lie in [1, that count]). Fewer than ``min_clients``
        valid updates skip the round.
        """
        pairs = list(updates.items() if isinstance(updates, Mapping) else updates)
        malformed = []
        if decode is not None:
            pairs, malformed = decode_updates(tasks, pairs, decode)
        metrics: dict[str, float] = {
            "clients": float(len(tasks)),
            "bytes_down": float(sum(payload_nbytes(t) for t in tasks.values())),
            "bytes_up": float(sum(payload_nbytes(u) for _, u in pairs)),
        }
        valid, rejected = screen_updates(tasks, pairs, {c: self.num_examples[c] for c in tasks},
                                         self.fingerprint)
        rejected = malformed + rejected
        valid = {c: dataclasses.replace(u, num_examples=self.num_examples[c]) for c, u in valid.items()}
        for r in rejected:
            log.warning("round %d: rejected %s", rnd, r)
        metrics["rejected"] = float(len(rejected))
        if rejected:  # named only when some are: a clean run's rows stay as they were
            metrics["rejected_clients"] = sorted({r.cid for r in rejected})
        metrics["dropped"] = float(len(set(tasks) - {c for c, _ in pairs} - {r.cid for r in malformed}))
        if len(valid) < self.min_clients:
            log.warning("round %d: %d valid updates < min_clients=%d; global state unchanged",
                        rnd, len(valid), self.min_clients)
            metrics["skipped"] = 1.0
            return metrics
        valid = self._bound_and_weigh(tasks, valid, metrics)
        cids = sorted(valid)
        weights = example_weights([valid[c].num_examples for c in cids])
        if self.head:
            self.head = weighted_sum_tensors([valid[c].head for c in cids], weights)
        metrics.update(self.strategy.aggregate(rnd, valid))
        if self.dp is not None:  # the strategy can take it: checked when the config loads
            self.dp.add_noise(self.strategy, self.head, rnd)
            metrics["dp_epsilon"] = self.dp.epsilon()
            return {k: v for k, v in metrics.items() if k in DP_RELEASED}
        losses = [valid[c].metrics.get("train_loss", float("nan")) for c in cids]
        metrics["train_loss"] = float(sum(w * x for w, x in zip(weights, losses)))
        glob = self.strategy.global_task()
        metrics.update(round_diagnostics(tasks, valid, glob, sample_modules(list(glob.factors), self.seed)))
        return metrics

    def _bound_and_weigh(self, tasks: Mapping[int, ClientTask], valid: dict[int, ClientUpdate],
                         metrics: dict[str, float]) -> dict[int, ClientUpdate]:
        p = self.privacy
        if self.adaptive or p.clip_norm or p.outlier_factor:
            norms = {c: self.measure(tasks[c], u) for c, u in valid.items()}
            clip = self.adaptive.bound_for(list(norms.values())) if self.adaptive else float(p.clip_norm)
            valid, norms, bounded = bound_updates(tasks, valid, clip, p.outlier_factor, self.factors, norms)
            metrics.update(bounded)
            if self.adaptive:
                metrics["clip_norm"] = clip
                self.adaptive.step(list(norms.values()))
        if self.dp is not None:
            return self.dp.bound(tasks, valid)
        if self.weighting == "uniform":  # every strategy weights by num_examples: one each is uniform
            valid = {c: dataclasses.replace(u, num_examples=1) for c, u in valid.items()}
        return valid

    def global_task(self) -> ClientTask:
        task = self.strategy.global_task()
        task.head = {k: v.clone() for k, v in self.head.items()}
        return task

    def state_dict(self) -> dict:
        return {"strategy": self.strategy.state_dict(), "head": {k: v.clone() for k, v in self.head.items()},
                "dp_rounds": self.dp.rounds if self.dp else 0,
                "clip_bound": self.adaptive.bound if self.adaptive else 0.0}

    def load_state_dict(self, sd: dict) -> None:
        self.strategy.load_state_dict(sd["strategy"])
        self.head = {k: torch.as_tensor(v).clone() for k, v in sd["head"].items()}
        if self.dp:
            self.dp.rounds = sd.get("dp_rounds", 0)
        if self.adaptive:
            self.adaptive.bound = sd.get("clip_bound", self.adaptive.bound)
