"""Running independent experiments side by side (``--jobs``): each run in a worker process that
owns its share of the CPU threads.

On 2 cores, two one-thread processes take 1.28x as many MiniLM training steps a second as one
two-thread process (a step spends much of its time outside large matrix products, where the
second thread idles); four study runs finished 1.11x sooner end to end, as each worker pays its
own start and its own round-0 evaluation (``benchmarks/study_jobs.py``). With more cores the gain
grows with ``jobs``. A run's numbers can differ from a one-job run's in the last float bits only
(a different thread count sums in another order: 2.5e-6 relative in the final loss).

Every run writes only its own directory (a first use of ``builtin:smollm2`` fills a shared cache:
that happens in the parent before any worker starts), so a worker crash loses at most the
unfinished rounds of its run; the caller's next invocation resumes it from its checkpoint. On a
GPU every worker loads its own copy of the model: ``--jobs`` is for CPU machines and for models
small enough to sit on the GPU N times.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from .config import RunConfig
from .errors import ConfigError
from .models import resolve_model_path
from .runner import run
from .simulate import simulate_round
from .study.references import Reference, run_reference


@dataclass(frozen=True)
class PendingRun:
    """One run still to do: ``cfg.output_dir`` is where it goes."""

    cfg: RunConfig
    label: str  # for progress lines, e.g. "fslora, seed 0"
    resume: bool = False  # a started run continues from its last checkpoint
    reference: Reference | None = None  # a reference line instead of a federated method


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_jobs(jobs: int) -> None:
    if jobs < 1:
        raise ConfigError(f"--jobs: must be at least 1, got {jobs}")


def run_one(p: PendingRun, progress: bool) -> None:
    if p.reference is not None:
        run_reference(p.reference, p.cfg, progress)
    else:
        run(p.cfg, simulate_round, overwrite=not p.resume, resume=p.resume, progress=progress)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _start_workers(pool: ProcessPoolExecutor, workers: int) -> None:
    """Start every worker before the first run is handed out. Python (3.11 at least) starts a worker
    on demand *after* waking the pool's watcher thread, which can re-arm on the old list of workers:
    the death of a worker started that way went unnoticed until another worker's run finished (a
    hang when none did)."""
    try:
        for f in [pool.submit(os.getpid) for _ in range(workers)]:
            f.result()
    except BrokenProcessPool:
        raise ConfigError("a worker process died while starting (out of memory?); run with fewer --jobs") from None


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def concurrency(jobs: int, runs: int) -> int:
    """How many runs ``execute`` has going at once."""
    return 1 if jobs == 1 or runs <= 1 else min(jobs, runs)


def _pool_died(stopped: Sequence[PendingRun], failed: Sequence[tuple[PendingRun, BaseException]]) -> ConfigError:
    """One line for a worker the system killed: every run it stopped, and any that had failed before
    (a worker dying can surface first as another run's error), so none is left unnamed."""
    earlier = "".join(f"; {p.label} had failed: {error}" for p, error in failed)
    return ConfigError(f"a worker process died (the system may have killed it: out of memory?); runs stopped: "
                       f"{', '.join(p.label for p in stopped)}{earlier}; run the same command again to resume "
                       "them, with fewer --jobs")


def execute(pending: Sequence[PendingRun], jobs: int = 1, progress: bool = True,
            on_done: Callable[[PendingRun], None] | None = None) -> None:
    """Run every pending run: one after another with ``jobs = 1`` (each with its progress bar), else
    ``jobs`` at a time in worker processes (one line per run finished); ``on_done`` hears of each
    finished run, in this process. After a run fails nothing new starts: the failure is told at once,
    the runs going finish, then its error is raised."""
    check_jobs(jobs)
    done_hook = on_done or (lambda _p: None)
    workers = concurrency(jobs, len(pending))
    if workers == 1:
        for p in pending:
            if progress:
                _say(f"run: {p.label} -> {p.cfg.output_dir}" + (" (resuming)" if p.resume else ""))
            run_one(p, progress)
            done_hook(p)
        return
    for model in {repr(p.cfg.model): p.cfg.model for p in pending}.values():
        resolve_model_path(model)  # a first use that fills a shared cache (builtin:smollm2) happens once, here
    threads = max(1, available_cores() // workers)
    if progress:
        _say(f"run: {len(pending)} runs, {workers} at a time, {threads} torch thread(s) each")
    started = time.perf_counter()
    spawn = multiprocessing.get_context("spawn")  # no forked torch state; the same on every OS
    queue = list(reversed(pending))
    finished, failure, failed = 0, None, []
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_init_worker, initargs=(threads,)) as pool:
        _start_workers(pool, workers)
        running: dict[Future, PendingRun] = {}
        while queue or running:
            while queue and failure is None and len(running) < workers:
                p = queue.pop()
                running[pool.submit(run_one, p, False)] = p
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                p, error = running.pop(f), f.exception()
                if isinstance(error, BrokenProcessPool):  # the system killed a worker (out of memory?)
                    raise _pool_died([p, *running.values()], failed) from None
                if error is not None:
                    failed.append((p, error))
                    if failure is None:
                        failure = error
                        if progress and running:
                            _say(f"run failed: {p.label}: {failure}; no new run starts, waiting for the "
                                 f"{len(running)} going (Ctrl-C stops them; they resume)")
                    continue
                finished += 1
                done_hook(p)
                if progress:
                    _say(f"run [{finished}/{len(pending)}] done: {p.label} ({time.perf_counter() - started:.0f} s in)")
    if failure is not None:
        raise failure
