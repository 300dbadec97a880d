"""One experiment, built once from a config and shared by both carriers: the model with LoRA,
the federated data, the budgets and the server; training one client; evaluating the global model.

The in-process simulator (``simulate``) and the Flower apps (``flower``) both drive
these functions; neither knows how the other carries a round.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from .budgets import client_budgets
from .client import local_train, round_lr
from .config import RunConfig
from .data import ChatDataset, Dataset, load_dataset, split_clients, subsample
from .device import autocast, resolve_device
from .encoding import (
    ChoiceQuestions,
    Encoded,
    encode_choices,
    encode_classification,
    encode_conversations,
    encode_pairs,
    eval_batches,
    generation_prompt,
    train_batches,
)
from .errors import ConfigError
from .evaluate import answer_loss_metrics, choice_logprobs, choice_metrics, classification_metrics
from .generation import generate, generation_metrics
from .lora import LoRAModel
from .models import load_model, resolve_targets
from .seeding import derive_seed, numpy_rng, torch_generator
from .server import FederatedServer
from .strategies import build_strategy, get_method
from .types import ClientTask, ClientUpdate, Strategy

log = logging.getLogger("fedlora.experiment")
SAMPLES = 20  # (prompt, reference, generation) triples an evaluation hands back to be written


@dataclass
class GenerationSet:
    """Held-out prompts that the global model answers by greedy generation at every evaluation."""

    prompts: list[str]  # readable: the conversation before the answer
    prompt_ids: list[list[int]]  # what the model is given (the chat template applied)
    references: list[str]


@dataclass
class FederatedData:
    encoded: Encoded
    clients: list[np.ndarray]  # row indices per client
    test: np.ndarray  # row indices of the global held-out set
    label_names: list[str]
    # causal-lm: the test prompts as multiple-choice questions over the label words
    questions: ChoiceQuestions | None = None
    generation: GenerationSet | None = None  # generative formats: prompts answered at every evaluation

    @property
    def generative(self) -> bool:
        return self.generation is not None

    def test_labels(self) -> np.ndarray:
        gold = self.questions.gold if self.questions is not None else self.encoded.labels[self.test]
        return gold.numpy()


@dataclass
class Experiment:
    """Everything a run needs, built once from a config."""

    cfg: RunConfig
    lm: LoRAModel
    data: FederatedData
    budgets: list[int]
    server: FederatedServer
    tokenizer: object = None


def clients_per_round(cfg: RunConfig) -> int:
    fed, n = cfg.federation, cfg.data.num_clients
    return fed.clients_per_round or max(1, math.ceil(fed.fraction * n))


def build_data(cfg: RunConfig, ds: Dataset, tokenizer) -> FederatedData:
    clients, test = split_clients(ds, cfg.data, cfg.seed)
    if isinstance(ds, ChatDataset):
        return build_chat_data(cfg, ds, tokenizer, clients, test)
    if cfg.model.task == "classification":
        encoded = encode_classification(tokenizer, ds.texts, ds.labels, cfg.model.max_length)
        return FederatedData(encoded=encoded, clients=clients, test=test, label_names=ds.label_names)
    # causal-lm: "prompt -> label name" pairs; questions scored over the label set
    names = ds.label_names
    try:
        prompts = [cfg.data.prompt_template.format(text=t, labels=", ".join(names)) for t in ds.texts]
    except (KeyError, IndexError) as e:
        raise ConfigError(f"data.prompt_template: unknown field {e}; use {{text}} and {{labels}}") from None
    encoded = encode_pairs(tokenizer, prompts, [names[y] for y in ds.labels], cfg.model.max_length)
    questions = encode_choices(tokenizer, [prompts[i] for i in test], names, ds.labels[test].tolist(),
                               cfg.model.max_length)
    return FederatedData(encoded=encoded, clients=clients, test=test, label_names=names, questions=questions)


def build_chat_data(cfg: RunConfig, ds: ChatDataset, tokenizer, clients: list[np.ndarray],
                    test: np.ndarray) -> FederatedData:
    """Conversations with the loss on their answers; ``eval.generate_examples`` held-out prompts."""
    encoded, cut = encode_conversations(tokenizer, ds.conversations, cfg.model.max_length)
    if cut:
        log.warning("%d of %d answers do not fit in model.max_length = %d tokens (after one prompt token) and "
                    "were cut at the end", cut, len(ds.conversations), cfg.model.max_length)
    n = min(cfg.eval.generate_examples, len(test))
    rows = np.sort(numpy_rng(cfg.seed, "generate").choice(test, n, replace=False)) if n else test[:0]
    prompts, ids, refs = [], [], []
    for i in rows:
        conv = ds.conversations[i]
        p, ref = generation_prompt(tokenizer, conv, cfg.model.max_length)
        before = conv[:max(j for j, m in enumerate(conv) if m["role"] == "assistant")]
        prompts.append(before[-1]["content"] if len(before) == 1 else
                       "\n".join(f"{m['role']}: {m['content']}" for m in before))
        ids.append(p)
        refs.append(ref)
    return FederatedData(encoded=encoded, clients=clients, test=test, label_names=ds.label_names,
                         generation=GenerationSet(prompts, ids, refs))


def build_experiment(cfg: RunConfig) -> Experiment:
    """Data, model (on ``train.device``), budgets and server, from ``cfg``."""
    device = resolve_device(cfg.train.device)
    ds = subsample(load_dataset(cfg.data), cfg.data.max_examples, cfg.seed)
    loaded = load_model(cfg.model, len(ds.label_names), cfg.seed, device, cfg.train.precision)
    data = build_data(cfg, ds, loaded.tokenizer)
    cfg.model.targets = resolve_targets(cfg.model, loaded.model)  # "auto" resolved once, as model.task is
    try:
        lm = LoRAModel(loaded.model, cfg.model.targets, head=loaded.head, dropout=cfg.model.dropout)
    except ValueError as e:
        raise ConfigError(f"model.targets: {e}") from None
    budgets = client_budgets(cfg.budgets, cfg.data.num_clients, cfg.seed)
    server = FederatedServer(
        build_global_strategy(cfg, lm, budgets), lm.head_state(), budgets, [len(c) for c in data.clients],
        fingerprint=lm.fingerprint, min_clients=cfg.reliability.min_clients,
        privacy=cfg.privacy, seed=cfg.seed, per_round=clients_per_round(cfg), weighting=cfg.strategy.weighting)
    return Experiment(cfg, lm, data, budgets, server, loaded.tokenizer)


def build_global_strategy(cfg: RunConfig, lm: LoRAModel, budgets: list[int]) -> Strategy:
    """The configured method over ``lm``'s modules for ``budgets``, started from ``model.init_adapter``
    when one is given."""
    s = cfg.strategy
    strategy = build_strategy(s.name, lm.shapes(), budgets, cfg.seed, s.global_rank, s.alpha, s.rslora,
                              s.method_settings())
    if cfg.model.init_adapter:
        from .adapters import start_from_adapter

        start_from_adapter(strategy, get_method(s.name), cfg.model.init_adapter, lm)
    return strategy


def train_client(exp: Experiment, rnd: int, cid: int, task: ClientTask) -> ClientUpdate:
    """One client's local round; its randomness depends only on (seed, round, client)."""
    cfg, train = exp.cfg, exp.cfg.train
    torch.manual_seed(derive_seed(cfg.seed, "dropout", rnd, cid))
    batches = train_batches(exp.data.encoded, exp.data.clients[cid], train.batch_size,
                            train.local_steps * train.grad_accum_steps, torch_generator(cfg.seed, "batches", rnd, cid))
    return local_train(exp.lm, task, batches, train, len(exp.data.clients[cid]),
                       lr=round_lr(train, rnd, cfg.federation.rounds))


def evaluate_global(exp: Experiment, samples: list[dict] | None = None) -> dict[str, float]:
    """The global model on the held-out set. A classifier: accuracy and loss. A causal LM on labels:
    accuracy of picking the right label by log-likelihood, and the answer-token loss. A generative
    format: answer-token loss and perplexity, then Rouge-L and exact match of greedy generations
    (``samples``, when given, receives up to 20 (prompt, reference, generation) triples)."""
    return evaluate_task(exp, exp.server.global_task(), samples)


def evaluate_task(exp: Experiment, task: ClientTask, samples: list[dict] | None = None) -> dict[str, float]:
    """The same, of the model ``task`` describes (e.g. one client's own model)."""
    exp.lm.load(task)
    batch_size = exp.cfg.federation.eval_batch_size
    data = exp.data
    with autocast(exp.lm.device, exp.cfg.train.precision):
        if data.generative:
            metrics = answer_loss_metrics(exp.lm.model, eval_batches(data.encoded, data.test, batch_size))
            gen, ev = data.generation, exp.cfg.eval
            if gen.prompt_ids:
                outputs = generate(exp.lm.model, exp.tokenizer, gen.prompt_ids, ev.max_new_tokens, ev.batch_size)
                metrics.update(generation_metrics(outputs, gen.references))
                if samples is not None:
                    samples.extend({"prompt": p, "reference": r, "generation": o}
                                   for p, r, o in list(zip(gen.prompts, gen.references, outputs))[:SAMPLES])
            return metrics
        if data.questions is None:
            return classification_metrics(exp.lm.model, eval_batches(data.encoded, data.test, batch_size))
        return choice_metrics(choice_logprobs(exp.lm.model, data.questions, batch_size), data.questions)
