"""Text -> token tensors: classification rows, prompt -> answer rows with the loss on the
answer only, multiple-choice questions; and the batches training and evaluation draw."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


@dataclass
class Encoded:
    """Tokenised rows, padded to a common length; batches are trimmed to their own length."""

    input_ids: Tensor  # (N, L)
    attention_mask: Tensor  # (N, L)
    labels: Tensor  # (N,) class ids, or (N, L) token labels with IGNORE where masked

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, idx: Tensor | np.ndarray) -> dict[str, Tensor]:
        idx = torch.as_tensor(idx)
        mask = self.attention_mask[idx]
        width = max(int(mask.sum(1).max()), 1)  # right padding: drop all-pad columns
        labels = self.labels[idx]
        if labels.dim() == 2:
            labels = labels[:, :width]
        return {"input_ids": self.input_ids[idx, :width], "attention_mask": mask[:, :width], "labels": labels}


def encode_classification(tokenizer, texts: Sequence[str], labels: np.ndarray, max_length: int) -> Encoded:
    enc = tokenizer(list(texts), max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.as_tensor(labels))


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
    rows, labels = [], []
    for prompt, answer in zip(prompts, answers):
        a = _answer_ids(tokenizer, answer)[:max_length - 1]
        p = _prompt_ids(tokenizer, prompt, max_length - len(a))
        rows.append(p + a)
        labels.append([IGNORE] * len(p) + a)
    ids, mask = _right_pad(rows, _pad_id(tokenizer))
    lab, _ = _right_pad(labels, IGNORE)
    return Encoded(ids, mask, lab)


@dataclass
class ChoiceQuestions:
    """Multiple-choice questions over one shared set of answers (e.g. the label words)."""

    prompts: Encoded  # (Q, L) prompt ids, right-padded; labels: the gold answer's index
    answers: list[list[int]]  # token ids of each answer, eos included

    @property
    def gold(self) -> Tensor:
        return self.prompts.labels


def encode_choices(tokenizer, prompts: Sequence[str], answers: Sequence[str], gold: Sequence[int],
                   max_length: int) -> ChoiceQuestions:
    """Prompts cut from the left so that each fits with the longest answer: every answer of a
    question is scored after the very same prompt tokens."""
    answer_ids = [_answer_ids(tokenizer, a) for a in answers]
    longest = max(len(a) for a in answer_ids)
    room = max_length - longest
    if room < 1:
        raise ConfigError(f"model.max_length: {max_length} tokens leave no room for a prompt before the "
                          f"longest answer ({longest} tokens with its end-of-text)")
    ids, mask = _right_pad([_prompt_ids(tokenizer, p, room) for p in prompts], _pad_id(tokenizer))
    return ChoiceQuestions(Encoded(ids, mask, torch.as_tensor(list(gold), dtype=torch.long)), answer_ids)


def _answer_ids(tokenizer, answer: str) -> list[int]:
    eos = tokenizer.eos_token_id
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])


def _prompt_ids(tokenizer, prompt: str, room: int) -> list[int]:
    """The rendered prompt's last ``room`` tokens (a prompt that does not fit loses its start)."""
    p = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    return p[max(0, len(p) - room):]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _right_pad(rows: list[list[int]], fill: int) -> tuple[Tensor, Tensor]:
    """(N, width) ids filled with ``fill`` after each row, and the 0/1 mask of real entries."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def train_batches(enc: Encoded, rows: np.ndarray, batch_size: int, steps: int,
                  generator: torch.Generator) -> Iterator[dict[str, Tensor]]:
    """``steps`` shuffled batches from ``rows``, reshuffled at every pass over the data."""
    rows_t = torch.as_tensor(rows)
    order = rows_t[torch.randperm(len(rows_t), generator=generator)]
    pos = 0
    for _ in range(steps):
        if pos >= len(order):
            order, pos = rows_t[torch.randperm(len(rows_t), generator=generator)], 0
        yield enc.batch(order[pos: pos + batch_size])
        pos += batch_size


def eval_batches(enc: Encoded, rows: np.ndarray, batch_size: int) -> Iterator[dict[str, Tensor]]:
    """Batches of ``rows`` sorted by length (less padding; order does not change metrics)."""
    lengths = enc.attention_mask[torch.as_tensor(rows)].sum(1)
    order = torch.as_tensor(rows)[torch.argsort(lengths, stable=True)]
    for start in range(0, len(order), batch_size):
        yield enc.batch(order[start: start + batch_size])
