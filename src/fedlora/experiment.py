"""One experiment, built once from a config and shared by both carriers: the model with LoRA,
the federated data, the budgets and the server; training one client; evaluating the global model.

The in-process simulator (``simulate``) and the Flower apps (``flower``) both drive
these functions; neither knows how the other carries a round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
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
from .token_cache import cached_encode
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
    # eval.where = "clients"/"both" (and a node's own file): each client's own held-out rows
    client_test: list[np.ndarray] | None = None

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
    # scores a model on the clients' own held-out rows: {client: (examples, metrics)}; default: in
    # this process (:func:`evaluate_clients`); a carrier that holds no client data asks its nodes
    client_evaluator: Callable[[Experiment, ClientTask], ClientScores] | None = None


ClientScores = dict[int, tuple[int, dict[str, float]]]
Split = tuple[list[np.ndarray], np.ndarray, "list[np.ndarray] | None"]  # clients, test, clients' own test


def clients_per_round(cfg: RunConfig) -> int:
    fed, n = cfg.federation, cfg.data.num_clients
    return fed.clients_per_round or max(1, math.ceil(fed.fraction * n))


def holdout(rows: np.ndarray, fraction: float, seed: int, cid: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of client ``cid``: a seeded ``fraction`` of its rows held out
    (at least one when it has two or more and ``fraction`` > 0)."""
    n = min(len(rows) - 1, max(1, round(fraction * len(rows)))) if fraction > 0 and len(rows) > 1 else 0
    held = np.zeros(len(rows), dtype=bool)
    held[numpy_rng(seed, "client-test", cid).choice(len(rows), n, replace=False)] = True
    return rows[~held], rows[held]


def build_data(cfg: RunConfig, ds: Dataset, tokenizer, split: Split | None = None) -> FederatedData:
    """Encoded rows and the split (``split``: given by the caller, e.g. a node's own file)."""
    if split is None:
        clients, test = split_clients(ds, cfg.data, cfg.seed)
        own = None
        if cfg.eval.where != "server":  # only then: the default split stays what it always was
            clients, own = map(list, zip(*(holdout(c, cfg.eval.client_fraction, cfg.seed, i)
                                           for i, c in enumerate(clients))))
        split = clients, test, own
    data = _encode(cfg, ds, tokenizer, split[0], split[1])
    data.client_test = split[2]
    return data


def _encode(cfg: RunConfig, ds: Dataset, tokenizer, clients: list[np.ndarray], test: np.ndarray) -> FederatedData:
    if isinstance(ds, ChatDataset):
        return build_chat_data(cfg, ds, tokenizer, clients, test)
    if cfg.model.task == "classification":
        encoded = cached_encode(encode_classification, tokenizer, ds.texts, ds.labels, cfg.model.max_length)
        return FederatedData(encoded=encoded, clients=clients, test=test, label_names=ds.label_names)
    # causal-lm: "prompt -> label name" pairs; questions scored over the label set
    names = ds.label_names
    try:
        prompts = [cfg.data.prompt_template.format(text=t, labels=", ".join(names)) for t in ds.texts]
    except (KeyError, IndexError) as e:
        raise ConfigError(f"data.prompt_template: unknown field {e}; use {{text}} and {{labels}}") from None
    encoded = cached_encode(encode_pairs, tokenizer, prompts, [names[y] for y in ds.labels], cfg.model.max_length)
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


def build_experiment(cfg: RunConfig, dataset: Dataset | None = None, split: Split | None = None) -> Experiment:
    """Data, model (on ``train.device``), budgets and server, from ``cfg``; ``dataset`` and ``split``
    replace ``data.name`` and the federated split (a node's own file, a server with no training data)."""
    device = resolve_device(cfg.train.device)
    ds = dataset if dataset is not None else subsample(load_dataset(cfg.data), cfg.data.max_examples, cfg.seed)
    loaded = load_model(cfg.model, len(ds.label_names), cfg.seed, device, cfg.train.precision)
    data = build_data(cfg, ds, loaded.tokenizer, split)
    cfg.model.targets = resolve_targets(cfg.model, loaded.model)  # "auto" resolved once, as model.task is
    try:
        lm = LoRAModel(loaded.model, cfg.model.targets, head=loaded.head, dropout=cfg.model.dropout)
    except ValueError as e:
        raise ConfigError(f"model.targets: {e}") from None
    budgets = client_budgets(cfg.budgets, cfg.data.num_clients, cfg.seed, cfg.strategy.global_rank)
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
    (``samples``, when given, receives up to 20 (prompt, reference, generation) triples).

    ``eval.where = "clients"``: the example-weighted mean over the clients' own held-out rows
    instead, ``"both"``: that too, as ``clients_<metric>``; each client's values under ``clients``."""
    where, task = exp.cfg.eval.where, exp.server.global_task()
    metrics = evaluate_task(exp, task, samples) if where != "clients" else {}
    if where != "server":
        scores = (exp.client_evaluator or evaluate_clients)(exp, task)
        mean = weighted_mean(scores)
        metrics.update(mean if where == "clients" else {f"clients_{k}": v for k, v in mean.items()})
        metrics["clients"] = {str(c): {"examples": n, **m} for c, (n, m) in sorted(scores.items())}
    return metrics


def evaluate_clients(exp: Experiment, task: ClientTask, cids: Iterable[int] | None = None) -> ClientScores:
    """The model ``task`` describes, scored on each client's own held-out rows (clients without any are
    left out): accuracy and loss of a classifier, answer loss and perplexity of a causal LM."""
    own = exp.data.client_test or []
    cids = range(len(own)) if cids is None else cids
    exp.lm.load(task)
    out: ClientScores = {}
    with autocast(exp.lm.device, exp.cfg.train.precision):
        for c in cids:
            if c < len(own) and len(own[c]):
                batches = eval_batches(exp.data.encoded, own[c], exp.cfg.federation.eval_batch_size)
                out[c] = len(own[c]), (classification_metrics(exp.lm.model, batches) if exp.cfg.model.task ==
                                       "classification" else answer_loss_metrics(exp.lm.model, batches))
    return out


def weighted_mean(scores: ClientScores) -> dict[str, float]:
    """Each metric's mean over the clients, weighted by their held-out examples (metrics all share)."""
    total = sum(n for n, _ in scores.values())
    names = set.intersection(*(set(m) for _, m in scores.values())) if scores else set()
    return {k: sum(n * m[k] for n, m in scores.values()) / total for k in sorted(names)} if total else {}


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
