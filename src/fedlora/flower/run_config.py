"""The Flower app's settings: its run config (``[tool.flwr.app.config]`` / ``--run-config``)
and each node's node-config, and the fedlora RunConfig they name."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from ..config import RunConfig, default_config_path, load_config
from ..errors import ConfigError
from .worker_link import NODE_WORKER  # noqa: F401 - node-config: the worker's socket (defined by its light channel)

# Keys of the run config, and of a node's node-config.
RUN_CONFIG_FILE, RUN_OVERRIDES = "config", "overrides"
RUN_OUTPUT, RUN_MIN_NODES, RUN_ROUND_TIMEOUT = "output-dir", "min-nodes", "round-timeout"
RUN_REGISTRY, RUN_REGISTER_TIMEOUT = "registry", "register-timeout"
RUN_RESUME, RUN_OVERWRITE = "resume", "overwrite"
NODE_PARTITION, NODE_BUDGET, NODE_DEVICE = "partition-id", "budget", "device"


def config_from_run_config(run_config: dict) -> RunConfig:
    """The fedlora RunConfig named by a Flower run config (file + ``key=value`` overrides)."""
    path = str(run_config.get(RUN_CONFIG_FILE, "") or default_config_path())
    overrides = shlex.split(str(run_config.get(RUN_OVERRIDES, "")))  # shell-style quoting
    cfg = load_config(path, overrides)
    if run_config.get(RUN_OUTPUT):
        cfg.output_dir = str(run_config[RUN_OUTPUT])
    return cfg


@dataclass(frozen=True)
class ServerSettings:
    """The ServerApp's own settings (the run config's keys other than the fedlora config's)."""

    min_nodes: int  # registered clients to wait for before round 1
    round_timeout: float  # seconds a round waits for replies
    register_timeout: float = 300.0  # seconds to wait for ``min_nodes`` registered clients
    registry: str = ""  # the operator's registry of allowed clients (TOML); "": any node may claim a free client
    resume: bool = True  # continue the run in the output directory from its newest good checkpoint
    overwrite: bool = False  # replace the run in the output directory (wins over ``resume``)


def _get(run_config: dict, key: str, kinds: tuple[type, ...], default):
    v = run_config.get(key, default)
    if isinstance(v, bool) != (bool in kinds) or not isinstance(v, kinds):
        raise ConfigError(f"run config {key!r}: expected {' or '.join(k.__name__ for k in kinds)}, got {v!r}")
    return v


def server_settings(run_config: dict, cfg: RunConfig) -> ServerSettings:
    s = ServerSettings(
        min_nodes=_get(run_config, RUN_MIN_NODES, (int,), cfg.data.num_clients),
        round_timeout=float(_get(run_config, RUN_ROUND_TIMEOUT, (int, float), 600.0)),
        register_timeout=float(_get(run_config, RUN_REGISTER_TIMEOUT, (int, float), 300.0)),
        registry=_get(run_config, RUN_REGISTRY, (str,), ""),
        resume=_get(run_config, RUN_RESUME, (bool,), True),
        overwrite=_get(run_config, RUN_OVERWRITE, (bool,), False))
    if not 1 <= s.min_nodes <= cfg.data.num_clients:
        raise ConfigError(f"run config {RUN_MIN_NODES!r}: {s.min_nodes} not in [1, data.num_clients = "
                          f"{cfg.data.num_clients}]")
    if s.round_timeout <= 0 or s.register_timeout <= 0:
        raise ConfigError(f"run config {RUN_ROUND_TIMEOUT!r} and {RUN_REGISTER_TIMEOUT!r} must be positive")
    return s
