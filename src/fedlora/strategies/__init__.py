"""Federated LoRA methods, one module each, all implementing :class:`fedlora.types.Strategy`.

``build_strategy(cfg, shapes, budgets, seed)`` is the single place a name becomes an object.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from ..config import ConfigError, StrategyConfig
from ..server_opt import ServerOptimizer
from ..types import Strategy
from .fedit import FactorAverage
from .ffa import FFALoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .fslora import FSLoRA
from .fullrank import full_rank_upper_bound
from .hetlora import HetLoRA

Shapes = Mapping[str, tuple[int, int]]
# (config, module shapes (out, in), every client's rank budget, seed) -> strategy
Builder = Callable[[StrategyConfig, Shapes, Sequence[int], int], Strategy]


def _fslora(cfg: StrategyConfig, shapes: Shapes, budgets: Sequence[int], seed: int) -> Strategy:
    return FSLoRA(shapes, cfg.global_rank, cfg.alpha, seed, cfg.rslora,
                  ServerOptimizer(cfg.server_optimizer, cfg.server_lr))


STRATEGIES: dict[str, Builder] = {
    "fslora": _fslora,
    "flexlora": lambda cfg, shapes, budgets, seed: FlexLoRA(
        shapes, cfg.alpha, seed, cfg.rslora, cfg.sigma_split),
    "hetlora": lambda cfg, shapes, budgets, seed: HetLoRA(
        shapes, budgets, cfg.alpha, seed, cfg.rslora, cfg.hetlora_norm_weighted),
    "flora": lambda cfg, shapes, budgets, seed: FLoRA(shapes, cfg.alpha, seed, cfg.rslora),
    "fedit": lambda cfg, shapes, budgets, seed: FactorAverage(
        shapes, min(budgets), cfg.alpha, seed, cfg.rslora, name="fedit"),
    "ffa": lambda cfg, shapes, budgets, seed: FFALoRA(shapes, budgets, cfg.alpha, seed, cfg.rslora),
    "fullrank": lambda cfg, shapes, budgets, seed: full_rank_upper_bound(
        shapes, cfg.global_rank, cfg.alpha, seed, cfg.rslora),
}


def build_strategy(
    cfg: StrategyConfig, shapes: Shapes, budgets: Sequence[int], seed: int
) -> Strategy:
    try:
        builder = STRATEGIES[cfg.name]
    except KeyError:
        raise ConfigError(
            f"strategy.name: unknown strategy {cfg.name!r}; choose one of {', '.join(STRATEGIES)}"
        ) from None
    return builder(cfg, shapes, budgets, seed)
