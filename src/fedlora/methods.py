"""The method registry: what the rest of fedlora knows about each federated LoRA method.

Each strategy module declares one :class:`Method` record; ``fedlora.strategies``
registers the built-in ones. The CLI's defaults, config validation (the method's own
``[strategy.<name>]`` settings, DP support), the study's descriptions and the tests all
read this registry, so adding a method is one file plus one :func:`register` call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError
from .types import Strategy


@dataclass(frozen=True)
class BuildContext:
    """What a method's builder gets: the model's adapted layers, the clients, the run's
    common strategy settings and the method's own settings (its dataclass, or None)."""

    shapes: Mapping[str, tuple[int, int]]  # module path -> (out_features, in_features)
    budgets: Sequence[int]  # every client's rank budget, by client id
    seed: int
    global_rank: int
    alpha: float
    rslora: bool = False
    settings: Any = None


Averaged = Literal["factors", "product"]


def _no_dp(settings: Any) -> str:
    return "its aggregate is not a mean of the clients' uploads, so noise on it has no DP meaning"


def _inexact(settings: Any) -> bool:
    return False


def _any_budget(built: Sequence[int], served: Sequence[int]) -> str | None:
    return None


def always(settings: Any) -> bool:
    return True


@dataclass(frozen=True)
class Method:
    """One federated LoRA method.

    Attributes:
        name: the key of ``strategy.name`` and of ``--methods``.
        build: context -> a fresh :class:`fedlora.types.Strategy`.
        summary: one line for reports and ``--help`` (the strategy module's first docstring line).
        settings: dataclass of the method's own keys (``[strategy.<name>]``), or None.
        dp_blocker: settings -> None when the server may add DP noise to this method's
            aggregate (the strategy then implements ``perturb_``), else the reason it may not.
        respects_budgets: False for references that ignore the clients' rank budgets.
        exact: settings -> True when the new global adapter is, by construction, the weighted
            mean ``Σ p_i M_i`` of the clients' trained adapters (its ``fidelity`` diagnostic is
            0 up to rounding; see :mod:`fedlora.diagnostics`).
        one_pair: the global adapter is one LoRA pair, the strategy's ``factors`` at its
            ``scale`` (nothing else until the first round), so training can start from an
            existing adapter (``model.init_adapter``).
        budget_blocker: (budgets the strategy is built for, budgets it must serve) -> None when
            it can serve every one, else a one-line reason (raFLoRA: a budget below its smallest
            rank level); checked where both are known, before any round.
        averages: what the server averages, and so what the server must bound per client
            (:mod:`fedlora.clipping`): ``"product"`` (each client's ``s B' A'``, exactly) or
            ``"factors"`` (``A`` and ``B`` separately, where a change that leaves the client's
            own product alone can still move the global one). ``"factors"`` is the safe
            default: its measure is never smaller than the product's.
    """

    name: str
    build: Callable[[BuildContext], Strategy]
    summary: str
    settings: type | None = None
    dp_blocker: Callable[[Any], str | None] = _no_dp
    respects_budgets: bool = True
    exact: Callable[[Any], bool] = _inexact
    one_pair: bool = False
    budget_blocker: Callable[[Sequence[int], Sequence[int]], str | None] = _any_budget
    averages: Averaged = "factors"

    def default_settings(self) -> Any:
        return self.settings() if self.settings is not None else None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a second method of the same name is an error)."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def averages(strategy: Strategy) -> Averaged:
    """What ``strategy``'s server averages (its registry record's ``averages``; ``"factors"``,
    the stricter bound, for a strategy built outside the registry)."""
    method = METHODS.get(strategy.name)
    return method.averages if method is not None else "factors"


def get_method(name: str, key: str = "strategy.name") -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"{key}: unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def first_line(doc: str | None) -> str:
    """The first line of a docstring (a method's summary)."""
    return (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""
