"""The server's client registry: which node trains which client, and what the server believes about it.

A node says which partition of the split it holds and, optionally, the rank budget it
can afford. The server decides the rest:

- a partition id must name a client of this run; the first node to claim a client keeps
  it while that node is online (a second claim is refused and logged). A refused claim
  stays refused: that node (id or key) never takes that client later, even when its
  holder goes offline for a moment;
- a budget above the cap (``strategy.global_rank`` or the operator's cap for that
  client) is clamped to it (logged); one below the operator's floor (run config
  ``min-budget``) is refused, since it would lower a common rank (FedIT's) for everyone;
  a node that gives none gets the config's budget;
- example counts, which weigh each client's update, are the server's: the size of the
  client's partition in the split the server computed, or the operator's number;
- each client is bound to its node's Flower identity: its public key (every SuperNode
  signs its requests with one; under ``--enable-supernode-auth`` only keys the operator
  registered get in) or, where a node has none, its node id. A node that comes back under
  a new node id with the same key gets its client back; in an open deployment (no
  registry file) a node with a new key may take a client whose node is gone (offline).

With a registry file (TOML, ``[[client]]`` tables; see docs/flower.md) only the clients it
lists can be claimed, each only by the node it names (``public_key`` or ``node_id``).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..config import read_toml
from ..errors import ConfigError

log = logging.getLogger("fedlora.flower")
FILE_KEYS = ("partition_id", "public_key", "node_id", "budget", "num_examples")


class Refuse(str, enum.Enum):
    MALFORMED = "malformed"  # its profile could not be read (a missing or non-integer field)
    OUT_OF_RANGE = "out_of_range"  # the partition id names no client of this run
    NOT_ALLOWED = "not_allowed"  # the operator's registry does not give that client to this node
    SLOT_TAKEN = "slot_taken"  # another node, still online, holds that client (the first claim keeps it)
    BELOW_FLOOR = "below_floor"  # its budget is below the operator's floor (run config min-budget)


class Refusal(NamedTuple):
    node_id: int
    reason: Refuse
    detail: str


def _logged(refusal: Refusal) -> Refusal:
    log.warning("node %s refused: %s (%s)", refusal.node_id, refusal.reason.value, refusal.detail)
    return refusal


@dataclass(frozen=True)
class Allowed:
    """One client of the operator's registry file."""

    cid: int
    budget: int  # the largest rank this client is sent
    num_examples: int | None = None  # its weight; None: the size of its partition in the server's split
    public_key: bytes = b""  # its node's key as Flower holds it (PEM SubjectPublicKeyInfo)
    node_id: int | None = None


@dataclass(frozen=True)
class Holder:
    node_id: int
    public_key: bytes


class ClientRegistry:
    """Claims of nodes on clients, checked and bound (pure Python; the ServerApp feeds it)."""

    def __init__(self, num_examples: Sequence[int], budgets: Sequence[int], global_rank: int,
                 allowed: Mapping[int, Allowed] | None = None, floor: int = 1) -> None:
        self.global_rank, self.floor = global_rank, floor
        self.allowed = None if allowed is None else dict(allowed)
        self.num_examples = list(num_examples)
        self.budgets = [self.clamp(c, b) for c, b in enumerate(budgets)]
        for c, a in (self.allowed or {}).items():
            self.budgets[c] = a.budget
            if a.num_examples is not None:
                self.num_examples[c] = a.num_examples
        self.holders: dict[int, Holder] = {}
        self.refused: set[tuple[int | bytes, int]] = set()  # (node id or key, client) of slot_taken refusals

    def cap(self, cid: int) -> int:
        if self.allowed is None:
            return self.global_rank
        return self.allowed[cid].budget if cid in self.allowed else self.global_rank

    def clamp(self, cid: int, budget: int) -> int:
        """``budget`` brought into ``[1, cap(cid)]``."""
        return min(max(budget, 1), self.cap(cid))

    def node_of(self, cid: int) -> int | None:
        return self.holders[cid].node_id if cid in self.holders else None

    def claim(self, node_id: int, public_key: bytes, cid: int, budget: int | None,
              online: Container[int]) -> Refusal | None:
        """Bind client ``cid`` to the node, or say (and log) why not."""
        refusal = self._check(node_id, public_key, cid, online)  # first: it range-checks cid
        want = budget if budget is not None or refusal else self.budgets[cid]
        got = 0 if refusal else self.clamp(cid, want)
        refusal = refusal or self._below_floor(node_id, cid, got)
        if refusal is not None:
            if refusal.reason is Refuse.SLOT_TAKEN:  # remembered: it must not win once the holder blinks
                self.refused.update((who, cid) for who in (node_id, public_key) if who)
            return _logged(refusal)
        if got != want:
            log.warning("node %s (client %d): budget %d clamped to %d", node_id, cid, want, got)
        old = self.holders.get(cid)
        if old is not None and old.node_id != node_id:
            log.warning("client %d: node %s takes over from node %s", cid, node_id, old.node_id)
        self.holders[cid] = Holder(node_id, public_key)
        self.budgets[cid] = got
        log.info("node %s registered as client %d (budget %d)", node_id, cid, got)
        return None

    def refuse(self, node_id: int, reason: Refuse, detail: str) -> Refusal:
        return _logged(Refusal(node_id, reason, detail))

    def _below_floor(self, node_id: int, cid: int, budget: int) -> Refusal | None:
        if budget >= self.floor:
            return None
        return Refusal(node_id, Refuse.BELOW_FLOOR, f"budget {budget} for client {cid} is below the run's "
                                                    f"floor {self.floor} (run config min-budget)")

    def _check(self, node_id: int, key: bytes, cid: int, online: Container[int]) -> Refusal | None:
        if not 0 <= cid < len(self.num_examples):
            return Refusal(node_id, Refuse.OUT_OF_RANGE, f"partition-id {cid} is not in [0, {len(self.num_examples)})")
        if self.allowed is not None:
            a = self.allowed.get(cid)
            if a is None:
                return Refusal(node_id, Refuse.NOT_ALLOWED, f"the registry lists no client {cid}")
            if (a.public_key and key != a.public_key) or (a.node_id is not None and node_id != a.node_id):
                return Refusal(node_id, Refuse.NOT_ALLOWED, f"client {cid} is registered to another node")
        held = self.holders.get(cid)
        same_identity = held is not None and (held.node_id == node_id or (key and key == held.public_key))
        if held is not None and not same_identity and held.node_id in online:
            return Refusal(node_id, Refuse.SLOT_TAKEN, f"client {cid} is held by node {held.node_id}")
        if not same_identity and ((node_id, cid) in self.refused or (key and (key, cid) in self.refused)):
            return Refusal(node_id, Refuse.SLOT_TAKEN, f"client {cid}: this node was refused it before")
        return None


def normalise_public_key(text: str) -> bytes:
    """An OpenSSH (``ecdsa-sha2-nistp384 AAAA...``) or PEM public key, as Flower stores it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    raw = text.strip().encode()
    if raw.startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(raw)
    else:
        key = serialization.load_ssh_public_key(raw)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"not an elliptic-curve key (Flower's SuperNodes use NIST EC keys): {type(key).__name__}")
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _number(entry: dict, where: str, key: str, low: int, high: int | None = None,
            required: bool = True) -> int | None:
    v = entry.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < low or (high is not None and v > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{where}.{key}: expected an integer {bounds}, got {v!r}")
    return v


def load_registry(path: str | Path, num_clients: int, global_rank: int) -> dict[int, Allowed]:
    """The operator's registry file: one ``[[client]]`` table per allowed client."""
    data = read_toml(path, "registry")
    clients = data.get("client")
    if set(data) != {"client"} or not isinstance(clients, list) or not clients:
        raise ConfigError(f"registry {path}: expected only [[client]] tables (at least one)")
    out: dict[int, Allowed] = {}
    seen: set = set()
    for i, e in enumerate(clients):
        where = f"registry {path}: client[{i}]"
        unknown = sorted(set(e) - set(FILE_KEYS)) if isinstance(e, dict) else ["(not a table)"]
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(FILE_KEYS)}")
        cid = _number(e, where, "partition_id", 0, num_clients - 1)
        if cid in out:
            raise ConfigError(f"{where}.partition_id: client {cid} is listed twice")
        if ("public_key" in e) == ("node_id" in e):
            raise ConfigError(f"{where}: give exactly one of public_key and node_id")
        key, node = b"", _number(e, where, "node_id", 0, required=False)
        if "public_key" in e:
            try:
                key = normalise_public_key(str(e["public_key"]))
            except (ValueError, TypeError) as err:
                raise ConfigError(f"{where}.public_key: {err}") from None
        if (key or node) in seen:
            raise ConfigError(f"{where}: the same node is listed for two clients")
        seen.add(key or node)
        out[cid] = Allowed(cid, _number(e, where, "budget", 1, global_rank),
                           _number(e, where, "num_examples", 1, required=False), key, node)
    return out
