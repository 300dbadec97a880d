"""The Flower app's settings: its run config (``[tool.flwr.app.config]`` / ``--run-config``)
and each node's node-config, and the fedlora RunConfig they name."""

from __future__ import annotations

import shlex

from ..config import RunConfig, default_config_path, load_config

# Keys of the run config, and of a node's node-config.
RUN_CONFIG_FILE, RUN_OVERRIDES = "config", "overrides"
RUN_OUTPUT, RUN_MIN_NODES, RUN_ROUND_TIMEOUT = "output-dir", "min-nodes", "round-timeout"
NODE_PARTITION, NODE_BUDGET, NODE_DEVICE = "partition-id", "budget", "device"


def config_from_run_config(run_config: dict) -> RunConfig:
    """The fedlora RunConfig named by a Flower run config (file + ``key=value`` overrides)."""
    path = str(run_config.get(RUN_CONFIG_FILE, "") or default_config_path())
    overrides = shlex.split(str(run_config.get(RUN_OVERRIDES, "")))  # shell-style quoting
    cfg = load_config(path, overrides)
    if run_config.get(RUN_OUTPUT):
        cfg.output_dir = str(run_config[RUN_OUTPUT])
    return cfg
