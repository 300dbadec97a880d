"""Text -> token tensors: classification rows, prompt -> answer rows and conversations with the
loss on the answers only, multiple-choice questions; and the batches training and evaluation draw."""

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
    if not texts:  # a server whose nodes hold all the data (the tokenizer refuses an empty batch)
        empty = torch.zeros(0, max_length, dtype=torch.long)
        return Encoded(empty, empty.clone(), torch.zeros(0, dtype=torch.long))
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


def encode_conversations(tokenizer, convs: Sequence[list[dict]], max_length: int) -> tuple[Encoded, int]:
    """Token ids of each conversation with labels on its assistant turns only; and how many
    final answers were longer than ``max_length`` and lost their end.

    A conversation that does not fit loses its start (earlier turns, then the prompt): its last
    answer is kept whole when it fits with one token before it.
    """
    rows, labels, cut = [], [], 0
    for conv in convs:
        ids, is_answer = conversation_tokens(tokenizer, conv)
        last = max(i for i, a in enumerate(is_answer) if a) + 1  # the last answer: [first, last)
        first = last
        while first > 0 and is_answer[first - 1]:
            first -= 1
        if last - first > max_length - 1:  # the answer alone does not fit: keep its beginning
            last, cut = first + max_length - 1, cut + 1
        start = max(0, last - max_length)
        rows.append(ids[start:last])
        labels.append([t if a else IGNORE for t, a in zip(ids[start:last], is_answer[start:last])])
    ids, mask = _right_pad(rows, _pad_id(tokenizer))
    lab, _ = _right_pad(labels, IGNORE)
    return Encoded(ids, mask, lab), cut


def conversation_tokens(tokenizer, conv: list[dict]) -> tuple[list[int], list[bool]]:
    """The conversation's token ids and, per token, whether it belongs to an assistant turn.

    With a chat template, each assistant turn is the text between the rendering of the
    conversation before it (with the generation prompt) and the rendering up to it, so the
    template's own end-of-turn marker is part of the answer and nothing about the template is
    guessed; tokens are those of the whole rendering. Without one, only a user -> assistant pair
    is possible: ``prompt + "\n"``, then ``answer + eos``.
    """
    if not getattr(tokenizer, "chat_template", None):
        if [m["role"] for m in conv] != ["user", "assistant"]:
            raise ConfigError("data.format: this tokenizer has no chat template, so only one user -> assistant "
                              f"pair per row is possible; got roles {[m['role'] for m in conv]}")
        p = tokenizer(render_prompt(tokenizer, conv[0]["content"]), add_special_tokens=False)["input_ids"]
        a = _answer_ids(tokenizer, conv[1]["content"])
        return p + a, [False] * len(p) + [True] * len(a)
    full = _render(tokenizer, conv)
    spans = []  # (start, end) characters of every assistant turn
    for i, m in enumerate(conv):
        if m["role"] == "assistant":
            before, upto = _render(tokenizer, conv[:i], True), _render(tokenizer, conv[:i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ConfigError("data.format: the tokenizer's chat template does not render a conversation's "
                                  "beginning as the beginning of its rendering; its assistant turns cannot be found")
            spans.append((len(before), len(upto)))
    try:  # a fast tokenizer: the characters of every token
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        starts = [s for s, _ in enc["offset_mapping"]]
        ids = enc["input_ids"]
    except NotImplementedError:  # count the tokens of each boundary's prefix instead
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        bounds = {c: len(tokenizer(full[:c], add_special_tokens=False)["input_ids"]) for span in spans for c in span}
        return ids, [any(bounds[s] <= t < bounds[e] for s, e in spans) for t in range(len(ids))]
    return ids, [any(s <= c < e for s, e in spans) for c in starts]


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2's TemplateError (e.g. a template that refuses a system turn): one line
        raise ConfigError(f"data.format: the chat template cannot render a conversation: {e}") from None


def generation_prompt(tokenizer, conv: list[dict], max_length: int) -> tuple[list[int], str]:
    """The prompt of the conversation's last answer, as token ids cut from the left to ``max_length``,
    and its reference (the answer's text)."""
    last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
    if getattr(tokenizer, "chat_template", None):
        text = _render(tokenizer, conv[:last], True)
    else:
        text = render_prompt(tokenizer, conv[0]["content"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[max(0, len(ids) - max_length):], conv[last]["content"]


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
