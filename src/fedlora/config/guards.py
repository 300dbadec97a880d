"""The tables of what the server enforces: surviving faults (``[reliability]``) and bounding
what any one client can do to the model, up to differential privacy (``[privacy]``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import check


@dataclass
class ReliabilityConfig:
    checkpoint_every: int = 1  # write a resumable checkpoint every N rounds (0: never)
    keep_checkpoints: int = 2  # the newest N are kept (an older one is the fallback)
    min_clients: int = 1  # a round with fewer valid updates leaves the global state as is
    dropout: float = 0.0  # simulator fault: probability that a sampled client drops out
    fail_clients: list[int] = field(default_factory=list)  # simulator fault: these raise

    def validate(self) -> None:
        check("reliability.checkpoint_every", self.checkpoint_every >= 0, "must be >= 0")
        check("reliability.keep_checkpoints", self.keep_checkpoints >= 1, "must be >= 1")
        check("reliability.min_clients", self.min_clients >= 1, "must be >= 1")
        check("reliability.dropout", 0 <= self.dropout < 1, "must be in [0, 1)")


@dataclass
class PrivacyConfig:
    # Bound each client's change to the global model, ||ΔW||_F: a number, 0 (off), or "auto":
    # a bound that tracks the clip_quantile of the updates' norms (adaptive clipping).
    clip_norm: float | Literal["auto"] = 0.0
    clip_init: float = 1.0  # "auto": the first round's bound
    clip_quantile: float = 0.5  # "auto": the share of updates the bound should leave unclipped
    clip_lr: float = 0.2  # "auto": how fast the bound moves (geometric)
    outlier_factor: float = 0.0  # zero updates whose norm exceeds this x the round's median (0: off)
    noise_multiplier: float = 0.0  # DP: Gaussian noise std = multiplier * dp_clip / expected clients
    dp_clip: float = 0.0  # DP: L2 clip of each client's uploaded factor increment
    delta: float = 1e-5  # DP: report epsilon at this delta
    reproducible_noise: bool = False  # DP sample and noise from the seed instead of OS entropy (tests only)

    def validate(self) -> None:
        check("privacy.clip_norm", self.clip_norm == "auto" or self.clip_norm >= 0,
              "must be >= 0 (0 disables clipping) or \"auto\"")
        check("privacy.clip_init", self.clip_init > 0, "must be positive")
        check("privacy.clip_quantile", 0 < self.clip_quantile < 1, "must be in (0, 1)")
        check("privacy.clip_lr", self.clip_lr > 0, "must be positive")
        check("privacy.outlier_factor", self.outlier_factor == 0 or self.outlier_factor > 1,
              "must be 0 (off) or above 1 (a multiple of the round's median norm)")
        check("privacy.dp_clip", self.dp_clip >= 0, "must be >= 0")
        check("privacy.noise_multiplier", self.noise_multiplier >= 0, "must be >= 0")
        check("privacy.noise_multiplier", not (self.noise_multiplier > 0 and self.dp_clip <= 0),
              "noise needs a clip: set privacy.dp_clip > 0")
        check("privacy.delta", 0 < self.delta < 1, "must be in (0, 1)")
