"""Splitting a labelled data set across clients: IID, Dirichlet label skew, one group each.

Pure functions of (labels, seed): the same inputs give the same split everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .seeding import numpy_rng


def iid_partition(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle ``range(n)`` and deal it into ``num_clients`` near-equal parts."""
    _check_enough(n, num_clients)
    perm = numpy_rng(seed, "iid").permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet_partition(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label skew: each class is split across clients by proportions ~ Dirichlet(alpha).

    Redraws (up to ``max_tries``) until every client holds at least ``min_size``
    examples, the usual way to keep tiny alphas from leaving clients empty.
    """
    labels = np.asarray(labels)
    _check_enough(len(labels), num_clients * min_size)
    rng = numpy_rng(seed, "dirichlet", alpha)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"Dirichlet(alpha={alpha}) left a client with fewer than {min_size} examples in "
        f"{max_tries} draws; raise data.alpha, lower data.num_clients or data.min_client_size"
    )


def balanced_dirichlet_partition(
    labels: Sequence[int] | np.ndarray, num_clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Label skew with equal client sizes (Hsu et al., 2019): client ``i`` draws class
    proportions ``q_i ~ Dirichlet(alpha * prior)`` and fills ``n / num_clients`` slots
    from the class pools (a pool that runs dry is dropped and ``q_i`` renormalised)."""
    labels = np.asarray(labels)
    _check_enough(len(labels), num_clients)
    rng = numpy_rng(seed, "dirichlet-balanced", alpha)
    classes, counts = np.unique(labels, return_counts=True)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    prior = counts / counts.sum()
    size = len(labels) // num_clients
    parts = []
    for _ in range(num_clients):
        q = rng.dirichlet(alpha * prior * len(classes))
        take: list[int] = []
        while len(take) < size:
            open_ = np.array([len(p) > 0 for p in pools])
            w = np.where(open_, q, 0.0)
            w = w / w.sum() if w.sum() > 0 else open_ / open_.sum()
            c = rng.choice(len(classes), p=w)
            take.append(int(pools[c].pop()))
        parts.append(np.sort(np.array(take, dtype=np.int64)))
    return parts


def group_partition(groups: Sequence[object], num_clients: int, seed: int) -> list[np.ndarray]:
    """One group (task, topic, label) per client; with more clients than groups, each
    group is shared by several clients, split IID among them."""
    groups = np.asarray(groups)
    names = sorted(set(groups.tolist()), key=str)
    if num_clients < len(names):
        raise ValueError(
            f"partition 'group' needs at least one client per group: {len(names)} groups, "
            f"{num_clients} clients"
        )
    rng = numpy_rng(seed, "group")
    owners: dict[object, list[int]] = {g: [] for g in names}
    for client in range(num_clients):
        owners[names[client % len(names)]].append(client)
    parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clients
    for g, clients in owners.items():
        idx = rng.permutation(np.flatnonzero(groups == g))
        for client, chunk in zip(clients, np.array_split(idx, len(clients))):
            parts[client] = np.sort(chunk)
    return parts


def stratified_holdout(labels: Sequence[int] | np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (train, test) with ``size`` test examples, class shares kept."""
    labels = np.asarray(labels)
    n = len(labels)
    if not 0 < size < n:
        raise ValueError(f"test size must be in [1, {n - 1}], got {size}")
    rng = numpy_rng(seed, "holdout")
    test: list[int] = []
    classes, counts = np.unique(labels, return_counts=True)
    quotas = np.floor(counts / n * size).astype(int)
    quotas[np.argsort(-counts)[: size - quotas.sum()]] += 1  # hand out the remainder
    for c, q in zip(classes, quotas):
        test.extend(rng.choice(np.flatnonzero(labels == c), size=q, replace=False).tolist())
    test_idx = np.sort(np.array(test, dtype=np.int64))
    train_idx = np.setdiff1d(np.arange(n), test_idx)
    return train_idx, test_idx


def _check_enough(n: int, needed: int) -> None:
    if n < needed:
        raise ValueError(f"{n} examples cannot fill the clients (need at least {needed})")
