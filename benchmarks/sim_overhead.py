"""Simulator overhead: the share of a round's wall time spent outside local training
(sampling, task building, loading factors into the model, screening, aggregation),
on the default job's model and data. Evaluation is excluded.

Phases are timed by wrapping the library's own functions, on real rounds.

    python benchmarks/sim_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from fedlora import client as client_mod
from fedlora import simulate
from fedlora.cli import default_config_path
from fedlora.config import load_config

SPENT: dict[str, float] = defaultdict(float)


def timed(name, fn):
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            SPENT[name] += time.perf_counter() - t0
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 clients, 1 round, 2 steps")
    args = ap.parse_args()
    over = ["federation.rounds=2", "output_dir=/tmp/fedlora-bench-overhead"]
    if args.quick:
        over += ["data.num_clients=3", "data.max_examples=1200", "data.test_size=200",
                 "train.local_steps=2", "federation.rounds=1"]
    cfg = load_config(default_config_path(), over)
    exp = simulate.build_experiment(cfg)
    # the part that must dominate: the optimiser loop inside local_train (forward, backward, step)
    orig_train = client_mod.local_train

    def split_train(lm, task, batches, train_cfg, n):
        t0 = time.perf_counter()
        lm.load(task)
        SPENT["load factors into model"] += time.perf_counter() - t0
        t1 = time.perf_counter()
        out = orig_train(lm, task, batches, train_cfg, n)  # loads again: cheap, counted below
        SPENT["local training (fwd/bwd/step)"] += time.perf_counter() - t1
        return out

    simulate.local_train = split_train
    exp.server.configure = timed("task building", exp.server.configure)
    exp.server.aggregate = timed("screening + aggregation", exp.server.aggregate)
    t0 = time.perf_counter()
    for rnd in range(1, cfg.federation.rounds + 1):
        simulate.simulate_round(exp, rnd)
    total = time.perf_counter() - t0
    # local_train's own load is inside the training time; take it out using the measured cost
    SPENT["local training (fwd/bwd/step)"] -= SPENT["load factors into model"]
    SPENT["load factors into model"] *= 2
    inside = SPENT["local training (fwd/bwd/step)"]
    print(f"{'phase':<32} {'seconds':>8} {'share':>7}")
    for name, sec in sorted(SPENT.items(), key=lambda kv: -kv[1]):
        print(f"{name:<32} {sec:8.3f} {sec / total:7.1%}")
    other = total - sum(SPENT.values())
    print(f"{'other (sampling, batching, ...)':<32} {other:8.3f} {other / total:7.1%}")
    print(f"overhead outside forward/backward: {(total - inside) / total:.1%} of {total:.1f} s")


if __name__ == "__main__":
    main()
