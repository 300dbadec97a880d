"""What a run reports besides ``metrics.jsonl``: the numbers of ``summary.json``, the progress bar's,
and ``generations.jsonl`` (what the global model wrote for held-out prompts, at the first and the
last evaluation).

A run is scored by its headline metric: accuracy for classification, Rouge-L for a generative
format (the answer loss when it generates nothing, ``eval.generate_examples = 0``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .experiment import Experiment

GENERATIONS = "generations.jsonl"
LABELS = {"accuracy": "accuracy", "rouge_l": "Rouge-L", "loss": "answer loss"}


def headline(metrics: dict[str, float]) -> str:
    """The name of the metric that scores a run, from one evaluation's metrics."""
    return next(name for name in ("accuracy", "rouge_l", "loss") if name in metrics)


def progress_fields(metrics: dict[str, float]) -> dict[str, str]:
    """The latest evaluation, for the progress bar: ``acc`` (classification) or ``rougeL``."""
    name = headline(metrics)
    return {{"accuracy": "acc", "rouge_l": "rougeL"}.get(name, "eval_loss"): f"{metrics[name]:.3f}"}


def summary(exp: Experiment, initial: dict[str, float], final: dict[str, float], wall_time_s: float,
            out: Path) -> dict:
    """``summary.json``: the headline metric before and after (``final_metric``, what ``compare`` and the
    study read), with ``final_accuracy`` and the majority class for classification, the answer loss,
    perplexity and exact match for the generative formats."""
    name = headline(final)
    if exp.data.generative:
        numbers = {"initial_loss": initial["loss"], "final_loss": final["loss"],
                   "final_perplexity": final["perplexity"], "test_examples": len(exp.data.test),
                   "generated_examples": len(exp.data.generation.prompt_ids)}
        for key in ("rouge_l", "rouge_l_stderr", "exact_match"):
            if key in final:
                numbers[f"initial_{key}"], numbers[f"final_{key}"] = initial[key], final[key]
    else:
        labels = exp.data.test_labels()  # none on a server whose nodes hold all the data
        majority = float(np.bincount(labels).max() / len(labels)) if len(labels) else None
        numbers = {"initial_accuracy": initial["accuracy"], "final_accuracy": final["accuracy"],
                   "final_loss": final["loss"], "majority_accuracy": majority}
    return {**numbers, "final_metric_name": name, "initial_metric": initial[name], "final_metric": final[name],
            "wall_time_s": wall_time_s, "output_dir": str(out)}


def final_line(s: dict) -> str:
    """The command line's last line about a finished run."""
    name = s.get("final_metric_name", "accuracy")
    if name == "accuracy":
        text = (f"initial accuracy {s['initial_accuracy']:.3f} -> final accuracy {s['final_accuracy']:.3f} "
                f"(majority class {s['majority_accuracy']:.3f})")
    else:
        text = f"initial {LABELS[name]} {s['initial_metric']:.3f} -> final {LABELS[name]} {s['final_metric']:.3f}"
        if name != "loss":
            text += f", answer loss {s['initial_loss']:.3f} -> {s['final_loss']:.3f}"
    return f"{text} in {s['wall_time_s']:.0f} s; results in {s['output_dir']}"


def write_generations(out: Path, rnd: int, samples: list[dict], first: bool) -> None:
    """Append (or, at the first evaluation, start) ``generations.jsonl`` with one evaluation's triples."""
    if not samples:
        if first:  # no stale file of a replaced run
            (out / GENERATIONS).unlink(missing_ok=True)
        return
    with (out / GENERATIONS).open("w" if first else "a") as f:
        for s in samples:
            f.write(json.dumps({"round": rnd, **s}, ensure_ascii=False) + "\n")
