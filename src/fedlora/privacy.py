"""Client-level differential privacy (DP-FedAvg style) around any strategy whose aggregate is a
mean of the uploads.

Each round: clients are Poisson-sampled (each independently with probability ``q``, as the
RDP accountant assumes), each uploaded increment is clipped in L2 to ``dp_clip``, the mean
uses the fixed denominator ``m = q N`` (so one client changes it by at most ``dp_clip / m``
whoever else took part), and Gaussian noise of std ``noise_multiplier * dp_clip / m`` is
added once to the aggregate. The sample and the noise come from OS entropy: anyone holding
``config.toml`` could otherwise redraw the noise and subtract it (``reproducible_noise``
is for tests, and warns).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import torch
from torch import Tensor

from .clipping import clip_increment, shrink
from .config import PrivacyConfig
from .seeding import torch_generator
from .types import ClientTask, ClientUpdate, NoisyStrategy

log = logging.getLogger("fedlora.privacy")


class DPMechanism:
    def __init__(self, cfg: PrivacyConfig, num_clients: int, per_round: int, seed: int) -> None:
        self.cfg, self.num_clients, self.seed = cfg, num_clients, seed
        self.q = min(1.0, per_round / num_clients)  # each client's sampling probability
        self.denominator = self.q * num_clients  # expected clients per round
        self.rounds = 0  # rounds the accountant has counted
        if cfg.reproducible_noise:
            log.warning("privacy.reproducible_noise = true: the DP sample and noise follow from the seed, so "
                        "anyone with config.toml can redraw and remove them; for tests only")

    def generator(self, purpose: str, rnd: int) -> torch.Generator:
        if self.cfg.reproducible_noise:
            return torch_generator(self.seed, purpose, rnd)
        return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") & (2**63 - 1))

    def sample(self, rnd: int) -> list[int]:
        """Poisson sampling: each client independently with probability ``q``."""
        keep = torch.rand(self.num_clients, generator=self.generator("dp-sample", rnd)) < self.q
        return torch.nonzero(keep).flatten().tolist()

    def bound(self, tasks: Mapping[int, ClientTask], updates: Mapping[int, ClientUpdate]) -> dict[int, ClientUpdate]:
        """Clip every increment to ``dp_clip`` and turn the strategies' mean over the ``n`` clients
        into the fixed-denominator one: equal weights, increments scaled by ``n / m``."""
        n = len(updates)
        out = {}
        for c, u in updates.items():
            clipped = clip_increment(tasks[c], u, self.cfg.dp_clip)
            out[c] = dataclasses.replace(shrink(tasks[c], clipped, n / self.denominator), num_examples=1)
        return out

    def noise_std(self) -> float:
        return self.cfg.noise_multiplier * self.cfg.dp_clip / self.denominator

    def add_noise(self, strategy: NoisyStrategy, head: dict[str, Tensor], rnd: int) -> None:
        """Gaussian noise, once per round, on the aggregate (factors and head); the round is counted."""
        std, g = self.noise_std(), self.generator("dp-noise", rnd)
        strategy.perturb_(std, g)
        for k in sorted(head):
            head[k] += torch.randn(head[k].shape, generator=g, dtype=head[k].dtype) * std
        self.rounds += 1

    def epsilon(self) -> float:
        """(epsilon, delta)-DP spent so far: opacus's RDP accountant for the Poisson-sampled
        Gaussian mechanism, one step per round."""
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        for _ in range(self.rounds):
            acc.step(noise_multiplier=self.cfg.noise_multiplier, sample_rate=self.q)
        return float(acc.get_epsilon(delta=self.cfg.delta))
