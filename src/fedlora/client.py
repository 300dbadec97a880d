"""Client side: local training of the factors (and head) a task hands out."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from .config import TrainConfig
from .lora import LoRAModel
from .types import ClientTask, ClientUpdate


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def local_train(
    lm: LoRAModel,
    task: ClientTask,
    batches: Iterable[dict[str, Tensor]],
    cfg: TrainConfig,
    num_examples: int,
) -> ClientUpdate:
    """Train the task's factors (and head) on ``batches``; return the trained factors.

    The loss is the model's own (``labels`` in the batch): cross-entropy for a
    classifier, next-token loss on unmasked labels for a causal LM.
    """
    if task.fingerprint and task.fingerprint != lm.fingerprint:
        raise ValueError(f"task is for base model {task.fingerprint}, this client has {lm.fingerprint}")
    lm.load(task)
    lm.model.train()
    params = lm.trainable_parameters()
    optimizer = make_optimizer(cfg, params)
    total, steps = 0.0, 0
    for batch in batches:
        loss = lm.model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        total += loss.item()
        steps += 1
    if steps and not math.isfinite(total):
        raise FloatingPointError("local training diverged (non-finite loss); lower train.lr")
    return ClientUpdate(
        factors=lm.factors(),
        num_examples=num_examples,
        head=lm.head_state(),
        metrics={"train_loss": total / max(steps, 1), "steps": float(steps)},
        fingerprint=lm.fingerprint,
        freeze_A=task.freeze_A,
    )
