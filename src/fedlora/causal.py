"""Causal-LM tasks: prompt -> answer rows trained with the loss on answer tokens only, and
evaluated by multiple-choice log-likelihood (as evaluation harnesses do) or by exact
match / Rouge-L of greedy generations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .data import Encoded

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


def render_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model expects it: its chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt + "\n"


def encode_pairs(tokenizer, prompts: Sequence[str], answers: Sequence[str], max_length: int) -> Encoded:
    """Token ids of ``prompt + answer + eos`` with labels on the answer (and eos) only.

    A prompt that does not fit is cut from its left, so the answer is always kept.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows, labels = [], []
    for prompt, answer in zip(prompts, answers):
        p = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        a = a[:max_length - 1]
        p = p[max(0, len(p) - (max_length - len(a))):]
        rows.append(p + a)
        labels.append([IGNORE] * len(p) + a)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r, la) in enumerate(zip(rows, labels)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        lab[i, :len(la)] = torch.tensor(la)
    return Encoded(ids, mask, lab)


def answer_logprobs(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
    """Summed log-probability of each row's labelled tokens, ``(N,)``."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:]
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != IGNORE)).sum(-1)


@torch.no_grad()
def multiple_choice_accuracy(model, choices: Encoded, gold: Tensor, num_choices: int,
                             batch_size: int = 16) -> float:
    """Accuracy of picking, per question, the choice with the highest summed log-probability.

    ``choices`` holds ``num_choices`` consecutive rows per question (prompt + choice).
    """
    scores = []
    for start in range(0, len(choices), batch_size):
        b = choices.batch(torch.arange(start, min(start + batch_size, len(choices))))
        scores.append(answer_logprobs(model, b["input_ids"], b["attention_mask"], b["labels"]))
    picked = torch.cat(scores).view(-1, num_choices).argmax(-1)
    return (picked == gold).float().mean().item()


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
