"""A data set's examples (classification rows or conversations) and the federated split
(clients + a held-out global test set). Where the rows come from: :mod:`fedlora.sources`."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import numpy as np

from .config import DataConfig
from .errors import ConfigError, check
from .formats import Conversation, check_columns, conversations
from .partition import (
    balanced_dirichlet_partition,
    dirichlet_partition,
    group_partition,
    iid_partition,
    stratified_holdout,
)
from .seeding import numpy_rng
from .sources import Rows, read_rows


@dataclass
class TextDataset:
    """Classification rows: texts and their class ids."""

    texts: list[str]
    labels: np.ndarray  # (N,) int64 class ids
    label_names: list[str]
    groups: np.ndarray | None = None  # optional group per row (task, topic)
    held_out: np.ndarray | None = None  # (N,) bool: rows of the data set's own test split


@dataclass
class ChatDataset:
    """Rows of a generative format, each a conversation whose assistant turns are the answers."""

    conversations: list[Conversation]
    labels: np.ndarray | None = None  # class ids of data.label_column, for a Dirichlet split
    label_names: list[str] = field(default_factory=list)
    groups: np.ndarray | None = None
    held_out: np.ndarray | None = None


Dataset = TextDataset | ChatDataset


def load_dataset(cfg: DataConfig) -> Dataset:
    """The rows of ``data.name`` in ``data.format``: a :class:`TextDataset` or a :class:`ChatDataset`."""
    rows = read_rows(cfg)
    if cfg.format == "classification":
        return load_text_dataset(cfg, rows)
    check_columns(rows, cfg)
    train = conversations(rows.train, cfg, rows.locate)
    test = conversations(rows.test, cfg, lambda i: f"{cfg.name} test row {i}") if rows.test is not None else []
    every = rows.train + (rows.test or [])
    dirichlet = cfg.partition.startswith("dirichlet")
    if dirichlet:
        _need(rows, cfg.label_column, f"data.partition = \"{cfg.partition}\" splits by class: data.label_column")
    if cfg.partition == "group" and not cfg.group_column:
        raise ConfigError(f"data.group_column: data.partition = \"group\" needs a group column of {rows.where} "
                          f"(columns: {', '.join(rows.columns)})")
    labels, names = _labels(every, cfg.label_column, rows, one_class_ok=True) if dirichlet else (None, [])
    return ChatDataset(train + test, labels, names, _groups(every, cfg, rows), _held_out(len(train), len(test)))


def load_text_dataset(cfg: DataConfig, rows: Rows | None = None) -> TextDataset:
    """Rows with text and label (see :mod:`fedlora.sources` for where they can come from)."""
    rows = rows or read_rows(cfg)
    for key in ("data.text_column", "data.label_column", "data.group_column"):
        col = getattr(cfg, key.split(".")[1])
        if col:
            _need(rows, col, key)
    every = [r for r in rows.train + (rows.test or []) if _present(r.get(cfg.text_column))]
    check("data.text_column", bool(every), f"every row of {rows.where} has an empty '{cfg.text_column}'")
    n_train = sum(_present(r.get(cfg.text_column)) for r in rows.train)
    labels, names = _labels(every, cfg.label_column, rows, declared=cfg.labels)
    return TextDataset(texts=[str(r[cfg.text_column]) for r in every], labels=labels, label_names=names,
                       groups=_groups(every, cfg, rows), held_out=_held_out(n_train, len(every) - n_train))


def _need(rows: Rows, col: str, key: str) -> None:
    if col not in rows.train[0]:
        raise ConfigError(f"{key}: column '{col}' not in {rows.where} (columns: {', '.join(rows.columns)})")


def _present(text) -> bool:
    return text is not None and bool(str(text).strip())


def _held_out(n_train: int, n_test: int) -> np.ndarray | None:
    return np.arange(n_train + n_test) >= n_train if n_test else None


def _groups(rows: list[dict], cfg: DataConfig, source: Rows) -> np.ndarray | None:
    if not cfg.group_column:
        return None
    _need(source, cfg.group_column, "data.group_column")
    return np.array([str(r.get(cfg.group_column)) for r in rows])


def label_key(value) -> tuple[str, str]:
    """(kind, class name) of a raw label. Numbers are one class however written: 1, 1.0 and "1" are "1";
    true/True/"true" are "true"; text is stripped. A column that mixes booleans and numbers is refused."""
    if isinstance(value, bool):
        return "boolean", str(value).lower()
    text = str(value).strip()
    if text.lower() in ("true", "false"):
        return "boolean", text.lower()
    try:
        number = float(text)
    except ValueError:
        return "text", text
    return "number", str(int(number)) if number.is_integer() else repr(number)


def _labels(rows: list[dict], col: str, source: Rows, one_class_ok: bool = False,
            declared: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Class ids (classes sorted by name, or in ``declared`` order) and the class names of column ``col``."""
    missing = next((i for i, r in enumerate(rows) if r.get(col) is None or str(r.get(col)).strip() == ""), None)
    check("data.label_column", missing is None, f"a row of {source.where} has no '{col}' label ({rows[missing]!r:.100})"
          if missing is not None else "")
    keys = [label_key(r[col]) for r in rows]
    kinds = {k for k, _ in keys}
    check("data.label_column", not {"boolean", "number"} <= kinds,
          f"column '{col}' mixes booleans and numbers (e.g. true and 1): write every label one way")
    if declared:  # one class list for every file of a federation, whatever each file holds
        unknown = sorted({name for _, name in keys} - set(declared))
        check("data.labels", not unknown, f"{source.where} has label {unknown[0]!r}, not one of {declared}"
              if unknown else "")
        ids = {n: i for i, n in enumerate(declared)}
        return np.array([ids[name] for _, name in keys], dtype=np.int64), list(declared)
    names = sorted({name for _, name in keys})
    check("data.label_column", one_class_ok or len(names) > 1,
          f"column '{col}' of {source.where} has one class only ({names[0]!r}); classification needs two or more")
    ids = {n: i for i, n in enumerate(names)}
    return np.array([ids[name] for _, name in keys], dtype=np.int64), names


def subsample(ds: Dataset, max_examples: int, seed: int) -> Dataset:
    """At most ``max_examples`` training rows (a seeded sample); the data set's own test rows are all kept."""
    train = np.arange(len(_rows(ds))) if ds.held_out is None else np.flatnonzero(~ds.held_out)
    if not max_examples or max_examples >= len(train):
        return ds
    keep = np.sort(train[numpy_rng(seed, "subsample").choice(len(train), max_examples, replace=False)])
    if ds.held_out is not None:
        keep = np.concatenate([keep, np.flatnonzero(ds.held_out)])
    return take(ds, keep)


def _rows(ds: Dataset) -> list:
    return ds.texts if isinstance(ds, TextDataset) else ds.conversations


def take(ds: Dataset, idx: np.ndarray) -> Dataset:
    """The rows ``idx`` of ``ds``, in that order."""
    def pick(x):
        return None if x is None else x[idx] if isinstance(x, np.ndarray) else [x[i] for i in idx]

    per_row = ("texts", "conversations", "labels", "groups", "held_out")
    return dataclasses.replace(ds, **{f.name: pick(getattr(ds, f.name)) for f in dataclasses.fields(ds)
                                      if f.name in per_row})


def split_clients(ds: Dataset, cfg: DataConfig, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(client row indices, test row indices): the held-out set first (the data set's own test rows,
    at most ``data.test_size`` of them, or a stratified sample), then the partition."""
    try:
        if ds.held_out is not None:
            train, test = np.flatnonzero(~ds.held_out), np.flatnonzero(ds.held_out)
            if len(test) > cfg.test_size:
                test = np.sort(numpy_rng(seed, "test-split").choice(test, cfg.test_size, replace=False))
        else:
            train, test = stratified_holdout(_strata(ds), cfg.test_size, seed)
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


def _strata(ds: Dataset) -> np.ndarray:
    """What the held-out sample keeps the shares of: the classes, else the groups, else nothing."""
    if ds.labels is not None:
        return ds.labels
    if ds.groups is not None:
        return np.unique(ds.groups, return_inverse=True)[1]
    return np.zeros(len(_rows(ds)), dtype=np.int64)


def split_fingerprint(clients: list[np.ndarray], test: np.ndarray) -> str:
    """SHA-256 of every client's row indices and the held-out rows, in order: two runs with
    the same fingerprint trained and were evaluated on exactly the same examples."""
    h = hashlib.sha256()
    for rows in [*clients, test]:
        h.update(np.asarray(rows, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()
