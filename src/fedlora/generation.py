"""Greedy generation on held-out prompts, and its scores: Rouge-L (the ``rouge-score`` package, F-measure
with stemming, as papers report it) and normalised exact match.

Prompts are generated in batches, left-padded so every row's last prompt token sits in the same
column, with the model's own key/value cache (``model.generate``); each row's continuation is cut
at its first end-of-text token.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Sequence

import torch

from .device import to_device


def generate(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """The greedy continuation of every prompt (token ids), decoded, in the prompts' order."""
    outputs = greedy_tokens(model, tokenizer, prompts, max_new_tokens, batch_size)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in outputs]


@torch.inference_mode()
def greedy_tokens(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int,
                  batch_size: int) -> list[list[int]]:
    """The greedy continuation of every prompt, up to (without) its first end-of-text token."""
    from transformers import GenerationConfig

    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = _stop_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=stop or None)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together: less padding
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):  # left padding
            ids[j, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
            mask[j, width - len(prompts[i]):] = 1
        batch = to_device({"input_ids": ids, "attention_mask": mask}, device)
        new = model.generate(**batch, generation_config=config)[:, width:].tolist()  # (b, <= max_new_tokens)
        for j, i in enumerate(rows):
            out[i] = new[j][:next((k for k, t in enumerate(new[j]) if t in stop), len(new[j]))]
    return out


def _stop_ids(model, tokenizer) -> list[int]:
    """End-of-text tokens: the tokenizer's, and the model's generation config's (a chat model's end of turn)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


@functools.cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F-measure of ``prediction`` against ``reference`` (rouge-score, Porter stemming)."""
    return _scorer().score(reference, prediction)["rougeL"].fmeasure


def normalise(text: str) -> str:
    """Lower case, runs of whitespace as one space, stripped: what exact match compares."""
    return " ".join(text.lower().split())


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean Rouge-L (and its standard error over the examples) and exact match."""
    scores = [rouge_l(p, r) for p, r in zip(predictions, references)]
    n = len(scores)
    stderr = statistics.stdev(scores) / n ** 0.5 if n > 1 else 0.0
    exact = sum(normalise(p) == normalise(r) for p, r in zip(predictions, references))
    return {"rouge_l": statistics.fmean(scores) if n else 0.0, "rouge_l_stderr": stderr,
            "exact_match": exact / max(n, 1)}
