"""Experiment trackers (``log.report_to``): every round's scalar metrics to TensorBoard
(``<output_dir>/tensorboard``, through ``torch.utils.tensorboard``) and/or Weights & Biases.

Both are optional imports; ``LogConfig.validate`` has already refused a tracker that is not installed.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from .config import RunConfig
from .config.loader import as_dict


class Trackers:
    """The trackers a run reports to (none by default: then every call does nothing)."""

    def __init__(self, cfg: RunConfig, out: Path, fresh: bool) -> None:
        self.tensorboard = self.wandb = None
        if "tensorboard" in cfg.log.report_to:
            from torch.utils.tensorboard import SummaryWriter

            folder = out / "tensorboard"
            if fresh:  # a replaced run's curves must not mix with this one's
                shutil.rmtree(folder, ignore_errors=True)
            self.tensorboard = SummaryWriter(str(folder))
        if "wandb" in cfg.log.report_to:
            import wandb

            self.wandb = wandb.init(project=cfg.log.project, name=out.name, dir=str(out), config=as_dict(cfg))

    def log(self, row: dict) -> None:
        """One metrics.jsonl row: its finite numbers, at step ``row["round"]``."""
        scalars = {k: float(v) for k, v in row.items() if k != "round" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, row["round"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["round"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
