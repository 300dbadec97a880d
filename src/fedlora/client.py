"""Client side: local training of the factors (and head) a task hands out."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from .config import TrainConfig
from .device import autocast, grad_scaler, to_device, windows
from .encoding import IGNORE
from .lora import LoRAModel
from .types import ClientTask, ClientUpdate


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def round_lr(cfg: TrainConfig, rnd: int, rounds: int) -> float:
    """The learning rate of round ``rnd`` (1-based): constant, or cosine from ``lr`` at round 1
    towards ``min_lr`` after the last round."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * (rnd - 1) / rounds))


def loss_terms(batch: dict[str, Tensor]) -> int:
    """How many terms the model's mean loss averages over: the examples of a classifier, the
    (shifted, unmasked) answer tokens of a causal LM, every target value of a regressor."""
    labels = batch["labels"]
    if labels.dtype == torch.long and labels.dim() == 2:  # causal LM: token t predicts label t + 1
        return int((labels[:, 1:] != IGNORE).sum())
    return len(labels) if labels.dtype == torch.long else labels.numel()


def local_train(
    lm: LoRAModel,
    task: ClientTask,
    batches: Iterable[dict[str, Tensor]],
    cfg: TrainConfig,
    num_examples: int,
    lr: float | None = None,
) -> ClientUpdate:
    """Train the task's factors (and head) on ``batches``; return the trained factors on the CPU.

    The loss is the model's own (``labels`` in the batch): cross-entropy for a classifier,
    next-token loss on unmasked labels for a causal LM. Every ``cfg.grad_accum_steps``
    micro-batches make one optimiser step, each weighted by its share of the window's loss
    terms, so the step equals one step on the concatenated batch. ``lr`` overrides
    ``cfg.lr`` (a schedule across rounds).
    """
    if task.fingerprint and task.fingerprint != lm.fingerprint:
        raise ValueError(f"task is for base model {task.fingerprint}, this client has {lm.fingerprint}")
    lm.load(task)
    lm.model.train()
    device = lm.device
    params = lm.trainable_parameters()
    optimizer = make_optimizer(cfg, params, cfg.lr if lr is None else lr)
    scaler = grad_scaler(device, cfg.precision)
    total, steps = 0.0, 0
    for window in windows(batches, cfg.grad_accum_steps):
        optimizer.zero_grad(set_to_none=True)
        terms = [loss_terms(b) for b in window] if len(window) > 1 else [1]
        window_loss = 0.0
        for batch, n in zip(window, terms):
            with autocast(device, cfg.precision):
                loss = lm.model(**to_device(batch, device)).loss
            if len(window) > 1:
                loss = loss * (n / sum(terms))
            scaler.scale(loss).backward()
            window_loss += loss.item()
        if cfg.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        total += window_loss
        steps += 1
    optimizer.zero_grad(set_to_none=True)  # no gradients or optimiser state outlive the client
    if steps and not math.isfinite(total):
        raise FloatingPointError("local training diverged (non-finite loss); lower train.lr")
    return ClientUpdate(
        factors=lm.factors(),
        num_examples=num_examples,
        head=lm.head_state(),
        metrics={"train_loss": total / max(steps, 1), "steps": float(steps)},
        fingerprint=lm.fingerprint,
        freeze_A=task.freeze_A,
        nonce=task.nonce,
    )
