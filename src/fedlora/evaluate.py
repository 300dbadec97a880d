"""Evaluating a model: classification accuracy, multiple-choice log-likelihood, answer-token loss
(generation and its scores: :mod:`fedlora.generation`).

Everything here runs under ``torch.inference_mode`` (no autograd state is kept) on a model
whose adapters are already loaded, on the device the model lives on.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterable

import torch
from torch import Tensor

from .device import to_device
from .encoding import IGNORE, ChoiceQuestions


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def classification_metrics(model, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """Accuracy and mean cross-entropy of a sequence classifier."""
    model.eval()
    device = _device(model)
    correct, loss_sum, count = 0, 0.0, 0
    for batch in batches:
        batch = to_device(batch, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"]
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        count += len(labels)
    return {"accuracy": correct / max(count, 1), "loss": loss_sum / max(count, 1)}


@torch.inference_mode()
def answer_loss_metrics(model, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """Mean cross-entropy of a causal LM over every labelled (answer) token, and its perplexity."""
    model.eval()
    device = _device(model)
    loss_sum, count = 0.0, 0
    for batch in batches:
        batch = to_device(batch, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        loss_sum += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                      ignore_index=IGNORE, reduction="sum").item()
        count += int((targets != IGNORE).sum())
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def answer_logprobs(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
    """Summed log-probability of each row's labelled tokens, ``(N,)``: the plain reference,
    one full forward pass per (prompt, answer) row."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:]
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != IGNORE)).sum(-1)


@torch.inference_mode()
def choice_logprobs(model, questions: ChoiceQuestions, batch_size: int = 16) -> Tensor:
    """``(Q, C)`` summed log-probability of every answer after every prompt.

    Each prompt runs through the model once; each answer then continues from a copy of the
    prompt's key/value cache at the positions it has in the full row, so the scores equal
    :func:`answer_logprobs` on ``prompt + answer`` rows (to float rounding) at about
    ``1 / C`` of the cost.
    """
    model.eval()
    device = _device(model)
    prompts, out = questions.prompts, []
    cache_argument = _cache_argument(model)
    for start in range(0, len(prompts), batch_size):
        b = to_device(prompts.batch(torch.arange(start, min(start + batch_size, len(prompts)))), device)
        ids, mask = b["input_ids"], b["attention_mask"]
        n, lengths = len(ids), mask.sum(1)
        ctx = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = ctx["cache"] if "cache" in ctx else ctx.past_key_values  # renamed in transformers 5.2x
        after_prompt = torch.log_softmax(ctx.logits[torch.arange(n), lengths - 1].float(), -1)  # (n, V)
        scores = []
        for answer in questions.answers:
            a = torch.tensor(answer, dtype=torch.long, device=device)
            score = after_prompt[:, a[0]]
            if len(a) > 1:  # feed a[:-1] after the prompt; it predicts a[1:]
                k = len(a) - 1
                cont = model(input_ids=a[:-1].expand(n, k), attention_mask=torch.cat([mask, mask.new_ones(n, k)], 1),
                             position_ids=lengths[:, None] + torch.arange(k, device=device),
                             use_cache=True, **{cache_argument: copy.deepcopy(cache)})
                logp = torch.log_softmax(cont.logits.float(), -1)  # (n, k, V)
                score = score + logp.gather(-1, a[1:].expand(n, k).unsqueeze(-1)).squeeze(-1).sum(1)
            scores.append(score)
        out.append(torch.stack(scores, 1).cpu())
    return torch.cat(out)


def _cache_argument(model) -> str:
    """The forward argument that takes a key/value cache: ``cache`` in newer transformers."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def choice_metrics(scores: Tensor, questions: ChoiceQuestions) -> dict[str, float]:
    """Accuracy of the best-scored answer, and the gold answers' loss per token."""
    gold = questions.gold
    tokens = sum(len(questions.answers[g]) for g in gold.tolist())
    return {"accuracy": (scores.argmax(1) == gold).float().mean().item(),
            "loss": -scores[torch.arange(len(gold)), gold].sum().item() / tokens}
