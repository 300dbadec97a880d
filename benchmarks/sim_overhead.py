"""Simulator overhead: the share of a round's wall time spent outside the training work
itself, on the default job's model and data (evaluation excluded).

Real rounds of ``fedlora.simulate.simulate_round``. The work is timed where it happens:
the model's forward (the top module's ``forward``), ``Tensor.backward``, and the
optimiser (``Optimizer.step`` via torch's global step hooks, ``zero_grad``, gradient
clipping). Everything else in the round is overhead, and the named parts of it are
timed by wrapping the library's own functions: task building (``server.configure``),
loading factors into the model (``LoRAModel.load``), batching (``train_batches``),
building the update (``LoRAModel.factors`` / ``head_state``), the optimiser's
construction, and screening + aggregation (``server.aggregate``).

    python benchmarks/sim_overhead.py            # default job, 2 rounds of 10 clients x 5 steps
    python benchmarks/sim_overhead.py --quick    # smoke test: 3 clients, 1 round, 2 steps
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from common import print_summary, summary_row
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from fedlora import client as client_mod
from fedlora import experiment, simulate
from fedlora.config import default_config_path, load_config

SPENT: dict[str, float] = defaultdict(float)
WORK = ("forward", "backward", "optimiser step")


def timed(name: str, fn: Callable) -> Callable:
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            SPENT[name] += time.perf_counter() - t0
    return wrapper


def timed_iter(name: str, fn: Callable[..., Iterator]) -> Callable[..., Iterator]:
    """Time the production of each item of a generator (lazy batching), not its consumer."""
    def wrapper(*a, **kw):
        it = fn(*a, **kw)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                SPENT[name] += time.perf_counter() - t0
                return
            SPENT[name] += time.perf_counter() - t0
            yield item
    return wrapper


def instrument(exp) -> Callable[[], None]:
    """Wrap the work and the simulator's phases; return a function that undoes it all."""
    lm, server = exp.lm, exp.server
    lm.model.forward = timed("forward", lm.model.forward)
    backward = torch.Tensor.backward
    torch.Tensor.backward = timed("backward", backward)
    zero_grad, clip = torch.optim.Optimizer.zero_grad, torch.nn.utils.clip_grad_norm_
    torch.optim.Optimizer.zero_grad = timed("zero_grad + grad clipping", zero_grad)
    torch.nn.utils.clip_grad_norm_ = timed("zero_grad + grad clipping", clip)
    started: list[float] = []
    pre = register_optimizer_step_pre_hook(lambda *_: started.append(time.perf_counter()))

    def post_hook(*_):
        SPENT["optimiser step"] += time.perf_counter() - started.pop()
    post = register_optimizer_step_post_hook(post_hook)
    lm.load = timed("load factors into model", lm.load)
    lm.factors = timed("build the update (copy factors, head)", lm.factors)
    lm.head_state = timed("build the update (copy factors, head)", lm.head_state)
    server.configure = timed("task building (configure)", server.configure)
    server.aggregate = timed("screening + aggregation", server.aggregate)
    batches, make_opt = experiment.train_batches, client_mod.make_optimizer
    experiment.train_batches = timed_iter("batching", batches)
    client_mod.make_optimizer = timed("optimiser construction", make_opt)

    def undo() -> None:
        torch.Tensor.backward = backward
        torch.optim.Optimizer.zero_grad, torch.nn.utils.clip_grad_norm_ = zero_grad, clip
        pre.remove()
        post.remove()
        experiment.train_batches, client_mod.make_optimizer = batches, make_opt
        for obj, names in ((lm.model, ["forward"]), (lm, ["load", "factors", "head_state"]),
                           (server, ["configure", "aggregate"])):
            for n in names:
                del obj.__dict__[n]
    return undo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 clients, 1 round, 2 steps")
    args = ap.parse_args()
    torch.set_num_threads(2)
    over = ["federation.rounds=2"]
    if args.quick:
        over += ["data.num_clients=3", "data.max_examples=1200", "data.test_size=200",
                 "train.local_steps=2", "federation.rounds=1"]
    cfg = load_config(default_config_path(), over)
    t0 = time.perf_counter()
    exp = experiment.build_experiment(cfg)
    build = time.perf_counter() - t0
    undo = instrument(exp)
    round_times = []
    try:
        for rnd in range(1, cfg.federation.rounds + 1):
            t0 = time.perf_counter()
            simulate.simulate_round(exp, rnd)
            round_times.append(time.perf_counter() - t0)
    finally:
        undo()
    total = sum(round_times)
    c, t = cfg.data.num_clients, cfg.train
    print(f"default job ({cfg.model.name}, {cfg.strategy.name}, r={cfg.strategy.global_rank}): "
          f"{cfg.federation.rounds} rounds x {c} clients x {t.local_steps} steps of batch {t.batch_size}; "
          f"rounds took {', '.join(f'{x:.1f}' for x in round_times)} s (experiment built once in {build:.1f} s)")
    print(f"{'phase':<40} {'seconds':>8} {'share':>7}")
    rows = sorted(SPENT.items(), key=lambda kv: (kv[0] not in WORK, -kv[1]))
    for name, sec in rows:
        print(f"{name:<40} {sec:8.3f} {sec / total:7.2%}" + ("   (work)" if name in WORK else ""))
    other = total - sum(SPENT.values())
    print(f"{'unattributed (sampling, loop, ...)':<40} {other:8.3f} {other / total:7.2%}")
    outside = total - sum(SPENT[w] for w in WORK)
    strict = total - SPENT["forward"] - SPENT["backward"]
    print(f"outside forward/backward/optimiser step: {outside / total:.2%}; "
          f"outside forward/backward alone: {strict / total:.2%} of {total:.1f} s")
    print_summary([summary_row("sim_overhead", "round time outside forward/backward/optimiser step",
                               f"{outside / total:.2%}", "<= 5%", outside / total <= 0.05),
                   summary_row("sim_overhead", "round time outside forward/backward (optimiser counted as overhead)",
                               f"{strict / total:.2%}", "(info)", None)])


if __name__ == "__main__":
    main()
