"""Deterministic random streams keyed by purpose, e.g. (seed, "sketch", round, client).

A stream depends only on its key, never on what ran before it, so the simulator and a
real Flower deployment draw the same sketch for the same (seed, round, client), and a
resumed run draws what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(*key: object) -> int:
    """A 63-bit seed from a key of ints and strings (stable across processes and versions)."""
    digest = hashlib.sha256(repr(tuple(key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def torch_generator(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*key))


def numpy_rng(*key: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*key))
