"""Run configuration: TOML tables -> validated dataclasses, and back.

Unknown keys and bad values raise :class:`ConfigError` naming the dotted key, so the CLI
can print one line and exit 2 instead of a traceback.
"""

from ..errors import ConfigError
from .guards import PrivacyConfig, ReliabilityConfig
from .loader import (
    apply_overrides,
    config_changes,
    default_config_path,
    from_dict,
    load_config,
    options,
    parse_override,
    read_toml,
    to_toml,
    toml_dict,
)
from .schema import (
    FORMAT_FIELDS,
    BudgetConfig,
    DataConfig,
    DataFormat,
    Distribution,
    EvalConfig,
    FederationConfig,
    LogConfig,
    ModelConfig,
    RunConfig,
    StrategyConfig,
    Task,
    TrainConfig,
)

__all__ = [
    "ConfigError", "apply_overrides", "config_changes", "default_config_path", "from_dict", "load_config", "options",
    "parse_override", "read_toml", "to_toml", "toml_dict", "BudgetConfig", "DataConfig", "Distribution",
    "FederationConfig", "ModelConfig", "PrivacyConfig", "ReliabilityConfig", "RunConfig", "StrategyConfig",
    "TrainConfig",
    "FORMAT_FIELDS", "DataFormat", "EvalConfig", "LogConfig", "Task",
]
