"""The data that crosses the server/client boundary, and the Strategy protocol.

Every round is three calls:

    Strategy.configure(rnd, clients) -> {cid: ClientTask}    # server side
    local_train(model, task, batches) -> ClientUpdate         # client side
    Strategy.aggregate(rnd, updates) -> metrics               # server side

The simulator and the Flower adapter only carry these objects; no transport type
ever reaches a strategy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor


@dataclass
class Factors:
    """One LoRA pair of a linear layer: the update is ``B @ A`` (times a scale)."""

    A: Tensor  # (r, in_features)
    B: Tensor  # (out_features, r)

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"Factors need A (r, in) and B (out, r) with the same r; "
                f"got A {tuple(self.A.shape)}, B {tuple(self.B.shape)}"
            )

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(out, in)`` of the dense update ``B @ A``."""
        return self.B.shape[0], self.A.shape[1]


LoRAState = dict[str, Factors]  # module path -> factors


@dataclass(frozen=True)
class ClientSpec:
    """What the server knows about a client when it builds its task."""

    cid: int
    budget: int  # largest LoRA rank this client can train
    num_examples: int


@dataclass
class ClientTask:
    """Server -> client: the factors to train, the forward scale, and frozen extras.

    Attributes:
        factors: the LoRA pair per module the client starts from (its rank is the
            rank the client trains).
        scale: forward scale ``s`` in ``W0 + s * B @ A``, chosen by the strategy.
        freeze_A: ``A`` stays as sent and is not uploaded (FFA-LoRA).
        base_delta: frozen low-rank terms added to the base weight, ``W0 + B_d @ A_d``
            (scale folded into ``B_d``); used by strategies that merge into the base.
        head: dense trainable parameters outside LoRA (e.g. a classifier head),
            federated by plain weighted averaging.
        config: scalar settings for the client (e.g. FSLoRA's sketch ratio).
        fingerprint: of the base model the task is for (see ``LoRAModel.fingerprint``);
            a client holding another base refuses it. Empty: not checked.
        effect_scale: the scale at which the client's factor change moves the GLOBAL model,
            when it differs from ``scale`` (FSLoRA: ``s``, while the client trains at
            ``s r / k``); clipping measures the change there. Server-side only, never sent.
        nonce: random per (round, client), drawn from OS entropy by a carrier that sends
            tasks over a wire; the update must return it, so a replayed or stale update is
            told apart from this round's answer. Empty: not checked (in-process).
    """

    factors: LoRAState
    scale: float
    freeze_A: bool = False
    base_delta: LoRAState = field(default_factory=dict)
    head: dict[str, Tensor] = field(default_factory=dict)
    config: dict[str, int | float | str] = field(default_factory=dict)
    fingerprint: str = ""
    effect_scale: float | None = None
    nonce: str = ""


@dataclass
class ClientUpdate:
    """Client -> server: the factors after local training, and how much data made them."""

    factors: LoRAState
    num_examples: int
    head: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    fingerprint: str = ""  # of the base model the client trained on (see LoRAModel)
    # True when the task froze A (FFA-LoRA): A is then not uploaded, nor counted as traffic;
    # the receiver restores it from the task it sent.
    freeze_A: bool = False
    nonce: str = ""  # the nonce of the task this update answers


class Strategy(Protocol):
    """A federated LoRA method. Pure torch: no I/O, no transport."""

    name: str

    def configure(self, rnd: int, clients: Sequence[ClientSpec]) -> dict[int, ClientTask]:
        """Build one task per sampled client for round ``rnd`` (1-based)."""
        ...

    def aggregate(self, rnd: int, updates: Mapping[int, ClientUpdate]) -> dict[str, float]:
        """Fold the round's updates into the global state; return scalar metrics."""
        ...

    def global_task(self) -> ClientTask:
        """The global model as a task (full factors, evaluation scale, base delta)."""
        ...

    def state_dict(self) -> dict:
        ...

    def load_state_dict(self, sd: dict) -> None:
        ...


class NoisyStrategy(Strategy, Protocol):
    """A strategy whose aggregate is a mean of the uploads, so the server may add DP noise
    to it (its registry record says so: ``Method.dp_blocker`` returns None)."""

    def perturb_(self, std: float, generator: torch.Generator) -> None:
        """Add ``N(0, std²)`` to every coordinate of the global state the round moved."""
        ...


def tensors_of(payload: ClientTask | ClientUpdate) -> dict[str, Tensor]:
    """Every tensor a task or update carries, under a flat, stable key.

    The Flower codec serialises exactly these tensors, and byte accounting counts
    exactly these, so the reported traffic is what is really sent. A base delta goes as its
    factors or, where cheaper (:func:`dense_is_cheaper`), as the dense product
    ``delta.<name>.W``, so it never costs more than ``m n`` numbers.
    """
    out: dict[str, Tensor] = {}
    skip_A = isinstance(payload, ClientUpdate) and payload.freeze_A
    for name, f in payload.factors.items():
        if not skip_A:
            out[f"lora.{name}.A"] = f.A
        out[f"lora.{name}.B"] = f.B
    for name, f in (payload.base_delta if isinstance(payload, ClientTask) else {}).items():
        if dense_is_cheaper(f):  # a grown delta (FedEx-LoRA, FLoRA, FLoRIST) goes as its m × n product
            out[f"delta.{name}.W"] = f.B @ f.A
        else:
            out[f"delta.{name}.A"] = f.A
            out[f"delta.{name}.B"] = f.B
    for name, t in payload.head.items():
        out[f"head.{name}"] = t
    return out


def dense_is_cheaper(f: Factors) -> bool:
    """Whether the dense ``m × n`` product is smaller than the factors: ``(m + n) r > m n``."""
    m, n = f.shape
    return (m + n) * f.rank > m * n


def payload_nbytes(payload: ClientTask | ClientUpdate) -> int:
    """Bytes of tensor data in a task or update (what goes over the wire)."""
    return sum(t.numel() * t.element_size() for t in tensors_of(payload).values())
