"""Labelled text data: loading (offline built-in, CSV/JSONL, or hub) and the federated
split (clients + a held-out global test set)."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DataConfig
from .errors import ConfigError
from .partition import (
    balanced_dirichlet_partition,
    dirichlet_partition,
    group_partition,
    iid_partition,
    stratified_holdout,
)
from .resources import BUILTIN_DATA, builtin_path
from .seeding import numpy_rng


@dataclass
class TextDataset:
    texts: list[str]
    labels: np.ndarray  # (N,) int64 class ids
    label_names: list[str]
    groups: np.ndarray | None = None  # optional group per row (task, topic)


def load_text_dataset(cfg: DataConfig) -> TextDataset:
    """Rows with text and label from a built-in name, a CSV/JSONL file, or a hub data set."""
    if cfg.name in BUILTIN_DATA:
        rows = _read_rows(builtin_path(cfg.name, BUILTIN_DATA, "data.name"))
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
