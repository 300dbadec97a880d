"""The tables of what the server enforces: surviving faults (``[reliability]``) and bounding
what any one client can do to the model, up to differential privacy (``[privacy]``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from ..errors import check

log = logging.getLogger("fedlora.config")


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
    """Robust by default (an adaptive clip and outlier zeroing on the quantity each method
    averages, see :mod:`fedlora.clipping`); under DP those data-dependent steps are off, as
    their thresholds come from un-noised client norms the accountant does not charge."""

    # Bound each client's effect on the global model: a number (in units of ||ΔW||_F), 0 (off),
    # or "auto": a bound that tracks the clip_quantile of the updates' norms (adaptive clipping).
    # Absent: "auto", or 0 under DP.
    clip_norm: float | Literal["auto"] | None = None
    clip_init: float = 0.0  # "auto": the first round's bound (0: that round's median norm)
    clip_quantile: float = 0.5  # "auto": the share of updates the bound should leave unclipped
    clip_lr: float = 0.2  # "auto": how fast the bound moves (geometric)
    # Zero updates whose norm exceeds this x the round's median (0: off). Absent: 3, or 0 under DP.
    outlier_factor: float | None = None
    noise_multiplier: float = 0.0  # DP: Gaussian noise std = multiplier * dp_clip / expected clients
    dp_clip: float = 0.0  # DP: L2 clip of each client's uploaded factor increment
    delta: float = 1e-5  # DP: report epsilon at this delta
    reproducible_noise: bool = False  # DP sample and noise from the seed instead of OS entropy (tests only)

    def __post_init__(self) -> None:
        dp = self.noise_multiplier > 0
        if dp and (self.clip_norm is None or self.outlier_factor is None):
            log.info("privacy.noise_multiplier > 0: the robust defaults (clip_norm = \"auto\", outlier_factor = 3) "
                     "are off, as DP accounts only for data-independent steps")
        if self.clip_norm is None:
            self.clip_norm = 0.0 if dp else "auto"
        if self.outlier_factor is None:
            self.outlier_factor = 0.0 if dp else 3.0

    def data_dependent(self) -> list[str]:
        """The set steps whose thresholds follow from the clients' un-noised norms."""
        return (['privacy.clip_norm = "auto"'] if self.clip_norm == "auto" else []) + (
            [f"privacy.outlier_factor = {self.outlier_factor:g}"] if self.outlier_factor else [])

    def validate(self) -> None:
        check("privacy.clip_norm", self.clip_norm == "auto" or self.clip_norm >= 0,
              "must be >= 0 (0 disables clipping) or \"auto\"")
        check("privacy.clip_init", self.clip_init >= 0, "must be >= 0 (0: the first round's median norm)")
        check("privacy.clip_quantile", 0 < self.clip_quantile < 1, "must be in (0, 1)")
        check("privacy.clip_lr", self.clip_lr > 0, "must be positive")
        check("privacy.outlier_factor", self.outlier_factor == 0 or self.outlier_factor > 1,
              "must be 0 (off) or above 1 (a multiple of the round's median norm)")
        check("privacy.dp_clip", self.dp_clip >= 0, "must be >= 0")
        check("privacy.noise_multiplier", self.noise_multiplier >= 0, "must be >= 0")
        check("privacy.noise_multiplier", not (self.noise_multiplier > 0 and self.dp_clip <= 0),
              "noise needs a clip: set privacy.dp_clip > 0")
        steps = self.data_dependent()
        check("privacy.noise_multiplier", not (self.noise_multiplier > 0 and steps),
              f"DP cannot be combined with {' and '.join(steps)}: their thresholds come from un-noised client "
              "norms that the accountant does not charge (set privacy.clip_norm to a number or 0, "
              "privacy.outlier_factor = 0)")
        check("privacy.delta", 0 < self.delta < 1, "must be in (0, 1)")
