"""Federated LoRA methods, one module each, all implementing :class:`fedlora.types.Strategy`.

Each module declares its :class:`fedlora.methods.Method` record; this package registers
the built-in ones (adding a method: one file, one line below). ``build_strategy`` is the
one place a name becomes an object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..methods import METHODS, BuildContext, Method, get_method, register
from ..types import Strategy
from . import fedex, fedit, ffa, flexlora, flora, florist, fslora, fullrank, hetlora, plora, raflora

for _module in (fslora, flexlora, hetlora, flora, fedit, ffa, fullrank, florist, raflora, plora, fedex):
    register(_module.METHOD)
register(fslora.UNBIASED)  # placed last: existing reports and tables keep their method order


def build_strategy(name: str, shapes: Mapping[str, tuple[int, int]], budgets: Sequence[int], seed: int,
                   global_rank: int, alpha: float, rslora: bool = False, settings: Any = None) -> Strategy:
    """A fresh strategy of method ``name``; ``settings`` defaults to the method's own defaults."""
    method = get_method(name)
    if settings is None:
        settings = method.default_settings()
    return method.build(BuildContext(shapes, budgets, seed, global_rank, alpha, rslora, settings))


__all__ = ["METHODS", "Method", "BuildContext", "build_strategy", "get_method", "register"]
