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
RUN_ROUND_GRACE, RUN_ROUND_QUORUM, RUN_SILENT_ROUNDS = "round-grace", "round-quorum", "silent-rounds"
RUN_MIN_BUDGET = "min-budget"
RUN_NODE_DATA, RUN_EXAMPLE_CAP = "node-data", "example-cap"  # nodes read their own files; the count cap
NODE_PARTITION, NODE_BUDGET, NODE_DEVICE = "partition-id", "budget", "device"
NODE_DATA, NODE_EVAL_DATA = "data-path", "eval-path"  # a node's own training file, its own held-out file
DEFAULT_EXAMPLE_CAP = 100_000  # the most examples a node's own declared count may weigh


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
    round_grace: float = 30.0  # seconds a round waits for the rest once ``round_quorum`` has answered
    round_quorum: float = 0.5  # fraction of a round's messages whose answers start the grace clock
    silent_rounds: int = 3  # a node silent this many times in a row is benched until it answers (0: never)
    min_budget: int = 1  # the lowest budget a node may hold (FedIT's common rank is the smallest one)
    node_data: bool = False  # each node reads its own ``data-path``; the server loads no training data


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
        overwrite=_get(run_config, RUN_OVERWRITE, (bool,), False),
        round_grace=float(_get(run_config, RUN_ROUND_GRACE, (int, float), 30.0)),
        round_quorum=float(_get(run_config, RUN_ROUND_QUORUM, (int, float), 0.5)),
        silent_rounds=_get(run_config, RUN_SILENT_ROUNDS, (int,), 3),
        min_budget=_get(run_config, RUN_MIN_BUDGET, (int,), 1),
        node_data=_get(run_config, RUN_NODE_DATA, (bool,), False))
    if not 1 <= s.min_nodes <= cfg.data.num_clients:
        raise ConfigError(f"run config {RUN_MIN_NODES!r}: {s.min_nodes} not in [1, data.num_clients = "
                          f"{cfg.data.num_clients}]")
    if s.round_timeout <= 0 or s.register_timeout <= 0:
        raise ConfigError(f"run config {RUN_ROUND_TIMEOUT!r} and {RUN_REGISTER_TIMEOUT!r} must be positive")
    if not 0 <= s.round_grace < float("inf"):
        raise ConfigError(f"run config {RUN_ROUND_GRACE!r}: {s.round_grace} is not a number of seconds >= 0")
    if not 0 < s.round_quorum <= 1:
        raise ConfigError(f"run config {RUN_ROUND_QUORUM!r}: {s.round_quorum} not in (0, 1]")
    if s.silent_rounds < 0:
        raise ConfigError(f"run config {RUN_SILENT_ROUNDS!r}: {s.silent_rounds} must be >= 0 (0: never bench)")
    if not 1 <= s.min_budget <= cfg.strategy.global_rank:
        raise ConfigError(f"run config {RUN_MIN_BUDGET!r}: {s.min_budget} not in [1, strategy.global_rank = "
                          f"{cfg.strategy.global_rank}]")
    return s


def example_cap(run_config: dict) -> int:
    """The most examples a node's own count may claim (run config ``example-cap``): server and node both apply it."""
    cap = _get(run_config, RUN_EXAMPLE_CAP, (int,), DEFAULT_EXAMPLE_CAP)
    if cap < 1:
        raise ConfigError(f"run config {RUN_EXAMPLE_CAP!r}: must be positive, got {cap}")
    return cap
