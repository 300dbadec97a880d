"""TOML -> :class:`RunConfig` (type-checked, ``key=value`` overrides applied) and back.

The loader is generic over dataclasses: ``int``/``float``/``bool``/``str``, lists,
``Literal`` option lists, tables of one value type (``dict[str, str]``), nested tables and
optional ones (``X | None``); a field without a default is a required key. A method's
``[strategy.<name>]`` table is read with the dataclass its registry record names.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from importlib.resources import files
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from ..errors import ConfigError
from ..strategies import METHODS
from .schema import RunConfig, StrategyConfig

DEFAULT_CONFIG = "default.toml"
# Keys that moved; an old config gets one line naming the new place.
MOVED = {
    "strategy.server_optimizer": "[strategy.fslora] server_optimizer",
    "strategy.server_lr": "[strategy.fslora] server_lr",
    "strategy.sigma_split": "[strategy.flexlora] sigma_split",
    "strategy.hetlora_norm_weighted": "[strategy.hetlora] norm_weighted",
}


def default_config_path() -> Path:
    """The built-in default job's config (shipped inside the package)."""
    return Path(str(files("fedlora") / "configs" / DEFAULT_CONFIG))


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, type-checking every value."""
    if cls is StrategyConfig:
        return _strategy_from_dict(data, prefix)
    return cls(**_typed_fields(cls, data, prefix))


def _typed_fields(cls: type, data: dict[str, Any], prefix: str, exclude: frozenset[str] = frozenset()) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - exclude
    unknown = sorted(set(data) - names)
    if unknown:
        key = prefix + unknown[0]
        if key in MOVED:
            raise ConfigError(f"{key} has moved: set it as {MOVED[key]}")
        raise ConfigError(f"unknown config key '{key}' (valid keys here: {', '.join(sorted(names))})")
    required = [f.name for f in dataclasses.fields(cls) if f.name in names and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [key for key in required if key not in data]
    if missing:
        raise ConfigError(f"missing config key '{prefix}{missing[0]}'")
    return {key: _coerce(hints[key], value, prefix + key) for key, value in data.items()}


def _strategy_from_dict(data: dict[str, Any], prefix: str) -> StrategyConfig:
    """``[strategy]``: its own keys, plus one ``[strategy.<method>]`` table per method."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a table, got {data!r}")
    own = _typed_fields(StrategyConfig, {k: v for k, v in data.items() if k not in METHODS}, prefix,
                        exclude=frozenset({"settings"}))
    settings = {}
    for name in (k for k in data if k in METHODS):
        method = METHODS[name]
        if method.settings is None:
            raise ConfigError(f"{prefix}{name}: method '{name}' has no settings of its own")
        settings[name] = from_dict(method.settings, data[name], f"{prefix}{name}.")
    return StrategyConfig(**own, settings=settings)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        options = typing.get_args(tp)
        if value not in options or isinstance(value, bool):
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, options))}; got {value!r}")
        return value
    if origin is dict:  # a table of one value type, e.g. data.columns
        _, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return {k: _coerce(value_tp, v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        # TOML has no null: `X | None` is an optional X (None when the key is absent); other unions
        # (e.g. `float | Literal["auto"]`) take the first member that accepts the value
        members = [t for t in typing.get_args(tp) if t is not type(None)]
        if len(members) == 1:
            return _coerce(members[0], value, key)
        errors = []
        for member in members:
            try:
                return _coerce(member, value, key)
            except ConfigError as e:
                errors.append(str(e).split(": ", 1)[1])
        raise ConfigError(f"{key}: {' or '.join(errors)}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        # no setting means anything at infinity or NaN (0 turns off what can be off); such a value only
        # surfaces later as a NaN model or a linear-algebra error
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def options(cls: type, name: str) -> tuple[str, ...]:
    """The choices of a ``Literal`` field (for command-line flags that mirror a config key)."""
    return typing.get_args(typing.get_type_hints(cls)[name])


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
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                methods: set[str] | None = None) -> RunConfig:
    """Read a TOML file (or the defaults), apply ``key=value`` overrides, validate.

    ``methods``: the methods whose ``[strategy.<method>]`` tables may appear (a comparison
    of several methods); by default only the running method's.
    """
    data = read_toml(path) if path is not None else {}
    apply_overrides(data, overrides or [])
    cfg = from_dict(RunConfig, data)
    cfg.validate(methods)
    return cfg


def as_dict(cfg: RunConfig) -> dict[str, Any]:
    """``cfg`` as TOML tables: each method's settings as ``[strategy.<method>]``, the running
    method's always written out (its defaults included), so config.toml re-runs as is."""
    data = dataclasses.asdict(cfg)
    strategy = data["strategy"]
    settings = strategy.pop("settings")
    running = cfg.strategy.method_settings()
    if running is not None:
        settings[cfg.strategy.name] = dataclasses.asdict(running)
    strategy.update(settings)
    return data


def to_toml(cfg: RunConfig) -> str:
    return tomli_w.dumps(as_dict(cfg))


def toml_dict(cfg: RunConfig) -> dict[str, Any]:
    """``cfg`` as it reads back from its config.toml (lists, not tuples), to compare with one."""
    return tomllib.loads(to_toml(cfg))


def config_changes(want: dict[str, Any], have: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, value in have, value in want)`` of every key whose value differs, sorted."""
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(want) | set(have)):
        name, a, b = f"{prefix}{key}", want.get(key), have.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{name}.")
        elif a != b:
            out.append((name, b, a))
    return out
