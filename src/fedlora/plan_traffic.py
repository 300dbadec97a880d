"""``fedlora plan CONFIG``: the bytes a config's run will move, method by method, before anything runs.

The model is built on the meta device (no weights), the budgets and the clients of every round are
drawn as the run draws them, and every round's tasks are counted as the run counts its traffic
(:mod:`fedlora.traffic`): the forecast is what ``metrics.jsonl`` will report when every client answers.
"""

from __future__ import annotations

from .budgets import client_budgets
from .config import RunConfig
from .experiment import clients_per_round
from .models import resolve_targets
from .plan import profile_model
from .strategies import build_strategy, get_method
from .traffic import forecast
from .units import parse_bytes


def planned_traffic(cfg: RunConfig, method: str, shapes: dict[str, tuple[int, int]]) -> list[tuple[int, int]]:
    """(bytes down, bytes up) of every round of ``cfg`` run with ``method`` over layers of ``shapes``
    (the config's ``[strategy.<method>]`` table for its own method, the defaults for the others)."""
    s = cfg.strategy
    settings = s.method_settings() if method == s.name else get_method(method).default_settings()
    budgets = client_budgets(cfg.budgets, cfg.data.num_clients, cfg.seed)

    def build(one_shapes: dict[str, tuple[int, int]]):
        return build_strategy(method, one_shapes, budgets, cfg.seed, s.global_rank, s.alpha, s.rslora, settings)

    return forecast(build, shapes, budgets, clients_per_round(cfg), cfg.seed, cfg.federation.rounds, cfg.privacy)


def first_round_over(rounds: list[tuple[int, int]], limit: int) -> int:
    """The first round whose bytes would take the run past ``limit`` (0: none does)."""
    total = 0
    for rnd, (down, up) in enumerate(rounds, 1):
        total += down + up
        if total > limit:
            return rnd
    return 0


def print_traffic(cfg: RunConfig, methods: list[str]) -> None:
    """A table: every method's bytes down, up and in all, against ``federation.max_total_bytes``."""
    cfg.model.targets = resolve_targets(cfg.model)
    shapes = profile_model(cfg.model, cfg.train.precision).shapes
    limit = parse_bytes(cfg.federation.max_total_bytes)
    fed = cfg.federation
    print(f"{cfg.model.name}: {len(shapes)} adapted layers ({', '.join(cfg.model.targets)}), global rank "
          f"{cfg.strategy.global_rank}; {fed.rounds} rounds of {clients_per_round(cfg)} of {cfg.data.num_clients} "
          f"clients; budgets {sorted(set(client_budgets(cfg.budgets, cfg.data.num_clients, cfg.seed)))}; "
          f"budget {f'{limit / 1e6:.1f} MB' if limit else 'none'} (1 MB = 1e6 bytes)")
    print(f"{'method':<10} {'down MB':>14} {'up MB':>12} {'total MB':>14} {'of budget':>10}  stops before round")
    for method in methods:
        rounds = planned_traffic(cfg, method, shapes)
        down, up = sum(d for d, _ in rounds), sum(u for _, u in rounds)
        share = f"{(down + up) / limit:10.1%}" if limit else f"{'-':>10}"
        over = first_round_over(rounds, limit) if limit else 0
        mark = "*" if method == cfg.strategy.name else " "
        print(f"{method + mark:<10} {down / 1e6:14.3f} {up / 1e6:12.3f} {(down + up) / 1e6:14.3f} {share}  "
              f"{over or '-'}")
    print("* the config's method. Every client answering; a classifier head adds its size per client each way; "
          "florist's merged rank depends on the data: counted at its first round's (a lower bound)")
