"""Evaluating a model: classification accuracy, multiple-choice log-likelihood, generation.

Everything here runs under ``torch.inference_mode`` (no autograd state is kept) on a model
whose adapters are already loaded, on the device the model lives on.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from .device import to_device
from .encoding import IGNORE, ChoiceQuestions, render_prompt


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


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F1 on whitespace tokens (longest common subsequence)."""
    p, r = prediction.split(), reference.split()
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for x in p:
        cur = [0]
        for j, y in enumerate(r):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def generation_scores(model, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                      max_new_tokens: int = 16) -> dict[str, float]:
    """Exact match and Rouge-L of greedy generations against reference answers."""
    em, rl = 0.0, 0.0
    for prompt, answer in zip(prompts, answers):
        ids = tokenizer(render_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        em += float(text.lower() == answer.strip().lower())
        rl += rouge_l(text.lower(), answer.strip().lower())
    n = max(len(prompts), 1)
    return {"exact_match": em / n, "rouge_l": rl / n}
