"""The run driver both carriers share: output directory, resume, the round loop, the summary.

``run`` calls a ``round_fn(exp, rnd)`` that carries one round (in-process in
:mod:`fedlora.simulate`, over a Flower grid in :mod:`fedlora.flower.server_app`);
evaluation, metrics, checkpoints and the exported adapter are the same for both.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from .adapters import peft_task_type
from .atomic import write_atomic
from .checkpoint import latest_checkpoint, save_checkpoint, state_misfit
from .config import RunConfig, to_toml
from .data import split_fingerprint
from .device import gpu_peak_gib, reset_gpu_peak
from .errors import ConfigError
from .experiment import Experiment, build_experiment, evaluate_global
from .export import save_peft_adapter
from .initial_eval import evaluate_initial
from .models import resolve_model_path, resolve_targets
from .outdir import SUMMARY, check_resume, output_lock, prepare_output_dir
from .outputs import progress_fields, summary, write_generations
from .tracking import Trackers
from .traffic import ByteBudget
from .units import parse_bytes

RoundFn = Callable[[Experiment, int], dict]
# summary.json's "status"; BUDGET_EXHAUSTED: a planned stop before the round that would pass federation.max_total_bytes
FINISHED, NO_ROUND_AGGREGATED, BUDGET_EXHAUSTED = "finished", "no_round_aggregated", "byte_budget_exhausted"
log = logging.getLogger("fedlora.runner")


def restore(exp: Experiment, out: Path) -> int:
    """Load the newest good checkpoint that fits this run; cut metrics.jsonl back to it. Returns its round."""
    fresh = exp.server.state_dict()  # what this run's ranks and model give: a checkpoint must match it

    def misfit(payload: dict) -> str | None:
        if not isinstance(payload.get("server"), dict):
            return "it holds no server state"
        return state_misfit(payload["server"], fresh)

    found = latest_checkpoint(out / "checkpoints", misfit)
    if found is None:
        (out / "metrics.jsonl").unlink(missing_ok=True)
        return 0
    rnd, payload = found
    kept = [r for r in read_metrics(out) if r["round"] <= rnd]
    if not kept or kept[0]["round"] != 0 or "eval_loss" not in kept[0]:  # the run's "before": not redone now
        raise ConfigError(f"--resume: {out / 'metrics.jsonl'} has no evaluation of round 0 (emptied?); pass "
                          "--overwrite to start the run afresh")
    try:
        exp.server.load_state_dict(payload["server"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:  # a crafted payload of the right shapes
        raise ConfigError(f"--resume: checkpoint of round {rnd} in {out / 'checkpoints'} does not fit this run "
                          f"({type(e).__name__}: {str(e)[:120]}); pass --overwrite to start afresh") from None
    write_atomic(out / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    return rnd


def read_metrics(out: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (a torn last line, from a kill mid-write, is dropped); a line that is
    not a row with an integer ``round`` is one line naming it (ConfigError)."""
    path = out / "metrics.jsonl"
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    rows = []
    for n, line in enumerate(lines, 1):
        if n == len(lines) and not line.endswith("}"):
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if not isinstance(row, dict) or type(row.get("round")) is not int:
            raise ConfigError(f"{path} line {n} is not a metrics row (a JSON object with an integer 'round'; edited "
                              "or damaged?); pass --overwrite to start the run afresh")
        rows.append(row)
    return rows


def eval_curve(out: Path, metric: str = "accuracy") -> list[tuple[int, float, float]]:
    """(round, cumulative upload in MB over all clients, ``metric``) at each evaluation of a run."""
    pts, up = [], 0.0
    for r in read_metrics(out):
        up += r.get("bytes_up", 0.0)
        if f"eval_{metric}" in r:
            pts.append((r["round"], up / 1e6, r[f"eval_{metric}"]))
    return pts


def eval_metrics(row: dict) -> dict[str, float]:
    """The ``eval_*`` entries of a metrics row, without the prefix."""
    return {k[5:]: v for k, v in row.items() if k.startswith("eval_")}


def run(cfg: RunConfig, round_fn: RoundFn, overwrite: bool = False, progress: bool = True,
        exp: Experiment | None = None, resume: bool = False) -> dict[str, float]:
    """Run every round, writing ``config.toml``, ``clients.json``, ``metrics.jsonl``,
    ``checkpoints/``, ``adapter/`` and ``summary.json`` into the output directory.

    With ``resume``, continue from the newest good checkpoint in the output directory (its
    settings must be this config's, ``federation.rounds`` may grow). The directory is locked
    while the run lasts: a second run on it is refused. ``summary.json``'s ``status`` is
    ``"finished"``, or ``"no_round_aggregated"`` when every round was skipped.
    """
    out = cfg.resolved_output_dir()
    with output_lock(out):
        return _run(cfg, round_fn, out, overwrite, progress, exp, resume)


def _run(cfg: RunConfig, round_fn: RoundFn, out: Path, overwrite: bool, progress: bool, exp: Experiment | None,
         resume: bool) -> dict[str, float]:
    fresh = prepare_output_dir(out, overwrite, resume) == 0
    cfg.model.targets = resolve_targets(cfg.model)  # "auto" -> the architecture's, so config.toml says what ran
    if not fresh:
        check_resume(cfg, out)
        (out / SUMMARY).unlink(missing_ok=True)  # a finished run given more rounds is unfinished again
    write_atomic(out / "config.toml", to_toml(cfg))
    start = time.perf_counter()
    exp = exp or build_experiment(cfg)
    write_clients(exp, out)
    fed, rel = cfg.federation, cfg.reliability
    done = 0 if fresh else restore(exp, out)
    trackers = Trackers(cfg, out, fresh=done == 0)
    if done == 0:
        samples: list[dict] = []
        row = {"round": 0, **{f"eval_{k}": v for k, v in evaluate_initial(exp, samples).items()},
               "wall_time_s": time.perf_counter() - start}
        _append(out, row)
        trackers.log(row)
        write_generations(out, 0, samples, first=True)
    rows = read_metrics(out)
    initial = eval_metrics(rows[0])
    last_eval = next(eval_metrics(r) for r in reversed(rows) if "eval_loss" in r)
    limit = parse_bytes(fed.max_total_bytes)
    budget = ByteBudget(limit, sum(r.get("bytes_down", 0.0) + r.get("bytes_up", 0.0) for r in rows)) if limit else None
    exhausted = budget is not None and done < fed.rounds and not budget.allows(exp.server, done + 1)
    bar = tqdm(range(done + 1, fed.rounds + 1), desc=f"{cfg.strategy.name}", unit="round",
               disable=not progress or exhausted, dynamic_ncols=True, initial=done, total=fed.rounds)
    for rnd in bar if not exhausted else ():
        t0 = time.perf_counter()
        reset_gpu_peak(exp.lm.device)
        metrics = round_fn(exp, rnd)
        if budget is not None:  # the next round must fit in what is left, predicted from its tasks
            budget.spend(metrics)
            metrics["bytes_budget_share"] = budget.share
            exhausted = rnd < fed.rounds and not budget.allows(exp.server, rnd + 1)
        last = rnd == fed.rounds or exhausted
        if rnd % fed.eval_every == 0 or last:
            samples = []
            last_eval = evaluate_global(exp, samples if last else None)
            metrics.update({f"eval_{k}": v for k, v in last_eval.items()})
            write_generations(out, rnd, samples, first=False)
        if (peak := gpu_peak_gib(exp.lm.device)) is not None:
            metrics["gpu_peak_gib"] = peak
        metrics["wall_time_s"] = time.perf_counter() - t0
        _append(out, {"round": rnd, **metrics})
        trackers.log({"round": rnd, **metrics})
        if rel.checkpoint_every and (rnd % rel.checkpoint_every == 0 or last):
            save_checkpoint(out / "checkpoints", rnd, {"round": rnd, "server": exp.server.state_dict(),
                                                       "budgets": exp.budgets}, keep=rel.keep_checkpoints)
        budget_field = {"bytes": f"{budget.share:.0%}"} if budget is not None else {}
        bar.set_postfix(loss=f"{metrics.get('train_loss', float('nan')):.3f}", **budget_field,
                        **progress_fields(last_eval))
        if exhausted:
            break
    if exhausted:
        log.warning("federation.max_total_bytes: stopped after round %d of %d: the next round would pass the "
                    "budget (%.0f of %d bytes used, %.1f%%)", read_metrics(out)[-1]["round"], fed.rounds,
                    budget.used, budget.limit, 100 * budget.share)
    trackers.close()
    save_peft_adapter(exp.server.global_task(), out / "adapter", resolve_model_path(cfg.model), cfg.strategy.alpha,
                      exp.lm.fan_in_fan_out, peft_task_type(cfg.model.task, exp.lm.model))
    result = summary(exp, initial, last_eval, time.perf_counter() - start, out)
    aggregated = sum(r["round"] > 0 and not r.get("skipped") for r in read_metrics(out))
    status = BUDGET_EXHAUSTED if exhausted else FINISHED if aggregated else NO_ROUND_AGGREGATED
    result.update(status=status, rounds_aggregated=aggregated)
    if budget is not None:
        result.update(bytes_used=budget.used, max_total_bytes=budget.limit)
    write_atomic(out / SUMMARY, json.dumps(result, indent=1) + "\n")
    return result


def write_clients(exp: Experiment, out: Path) -> None:
    """``clients.json``: every client's budget and example count, and a hash of the split."""
    d = exp.data
    write_atomic(out / "clients.json", json.dumps(
        {"budgets": exp.budgets, "num_examples": [len(c) for c in d.clients], "test_examples": len(d.test),
         "labels": d.label_names, "split_sha256": split_fingerprint(d.clients, d.test)}, indent=1))


def _append(out: Path, record: dict) -> None:
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
