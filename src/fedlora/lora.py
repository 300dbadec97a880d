"""LoRA on any linear-like layer: a wrapper whose rank and scale the strategy sets each round.

Linear-like: ``nn.Linear``, bitsandbytes' quantised linears (whose packed weight is not
the dense matrix) and transformers' ``Conv1D`` (GPT-2, weight stored transposed). The
wrapper calls the base layer's own forward and adds the low-rank path, so it never needs
the base weight itself. The layer never derives its scale from its own rank: a client that
trains a sketched rank-``k`` block of a rank-``r`` adapter must use the strategy's ``s * r / k``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .types import ClientTask, Factors, LoRAState, dense_is_cheaper


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(out_features, in_features)`` of a linear-like layer, or None for anything else."""
    if isinstance(module, Conv1D):  # GPT-2's transposed linear: nf outputs, nx inputs
        return module.nf, module.nx
    out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if isinstance(out_f, int) and isinstance(in_f, int):  # nn.Linear and bitsandbytes' Linear4bit/8bitLt
        return out_f, in_f
    return None


class LoRALinear(nn.Module):
    """``y = base(x) + scale * dropout(x) @ A.T @ B.T  [+ x @ A_d.T @ B_d.T]``."""

    def __init__(self, base: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        shape = linear_shape(base)
        if shape is None:
            raise TypeError(f"{type(base).__name__} is not a linear-like layer")
        self.base, self.shape = base, shape
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = 0.0
        ref = next(base.parameters())
        # LoRA weights stay float32 over a bf16/fp16 or quantised (integer-packed) base, as PEFT
        # does: small, and exact; a float64 base (tests) keeps float64.
        self.lora_dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        out_f, in_f = shape
        empty = {"dtype": self.lora_dtype, "device": ref.device}
        self.lora_A = nn.Parameter(torch.zeros(0, in_f, **empty))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_f, 0, **empty))  # (out, r)
        # Frozen low-rank delta merged "into the base" by strategies such as FLoRA.
        self.register_buffer("delta_A", torch.zeros(0, in_f, **empty), persistent=False)
        self.register_buffer("delta_B", torch.zeros(out_f, 0, **empty), persistent=False)
        # ... or its product, when the factors outweigh it (a delta sent dense, a grown one)
        self.register_buffer("delta_W", torch.zeros(0, in_f, **empty), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.lora_A.device

    def _own(self, t: Tensor) -> Tensor:
        """A private copy of ``t`` on this layer's device, in the LoRA dtype."""
        return t.detach().to(device=self.device, dtype=self.lora_dtype, copy=True)

    def set_factors(self, f: Factors, scale: float, freeze_A: bool = False) -> None:
        """Load a pair of any rank (copied, so the caller's tensors are never trained)."""
        if f.shape != self.shape:
            raise ValueError(f"factors of shape {f.shape} do not fit a layer of shape {self.shape}")
        self.lora_A = nn.Parameter(self._own(f.A), requires_grad=not freeze_A)
        self.lora_B = nn.Parameter(self._own(f.B))
        self.scale = float(scale)

    def set_delta(self, f: Factors | None) -> None:
        out_f, in_f = self.shape
        dense = f is not None and dense_is_cheaper(f)
        self.delta_A = self.delta_A.new_zeros(0, in_f) if f is None or dense else self._own(f.A)
        self.delta_B = self.delta_B.new_zeros(out_f, 0) if f is None or dense else self._own(f.B)
        self.delta_W = self._own(f.B) @ self._own(f.A) if dense else self.delta_W.new_zeros(0, in_f)

    def factors(self) -> Factors:
        """The trained pair, on the CPU (what an update carries)."""
        return Factors(A=self.lora_A.detach().to("cpu", copy=True), B=self.lora_B.detach().to("cpu", copy=True))

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        xf = x.to(self.lora_dtype)
        if self.lora_A.shape[0] > 0:
            y = y + ((self.dropout(xf) @ self.lora_A.T @ self.lora_B.T) * self.scale).to(y.dtype)
        if self.delta_A.shape[0] > 0:
            y = y + (xf @ self.delta_A.T @ self.delta_B.T).to(y.dtype)
        if self.delta_W.shape[0] > 0:
            y = y + (xf @ self.delta_W.T).to(y.dtype)
        return y


def matches(name: str, targets: Iterable[str]) -> bool:
    """PEFT-style target match: the module's own name (or a dotted suffix) equals a target,
    or a target prefixed ``re:`` full-matches the whole path."""
    for t in targets:
        if t.startswith("re:"):
            if re.fullmatch(t[3:], name):
                return True
        elif name == t or name.endswith("." + t):
            return True
    return False


def inject_lora(model: nn.Module, targets: Iterable[str], dropout: float = 0.0) -> dict[str, LoRALinear]:
    """Wrap every linear-like layer whose path matches ``targets``; freeze the rest of the model.

    Returns module path -> wrapper, in model order. Raises if nothing matches, naming
    a few linear layers the user could have meant.
    """
    targets = list(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    linear = [(n, m) for n, m in model.named_modules() if linear_shape(m) is not None]
    chosen = [(n, m) for n, m in linear if matches(n, targets)]
    if not chosen:
        examples = sorted({n.rsplit(".", 1)[-1] for n, _ in linear})[:12]
        raise ValueError(f"no linear layer matches targets {targets}; linear layers here end in {examples}")
    wrappers: dict[str, LoRALinear] = {}
    for name, lin in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = LoRALinear(lin, dropout)
        setattr(parent, child, wrapper)
        wrappers[name] = wrapper
    return wrappers


class LoRAModel:
    """A model with LoRA injected, its adapted layers, and its dense trainable head."""

    def __init__(self, model: nn.Module, targets: Iterable[str], head: Iterable[str] = (),
                 dropout: float = 0.0) -> None:
        self.model = model
        self.layers = inject_lora(model, targets, dropout)
        params = dict(model.named_parameters())
        self.head_names = sorted(head)
        missing = [h for h in self.head_names if h not in params]
        if missing:
            raise ValueError(f"head parameters not found in the model: {missing}")
        self._head = {n: params[n] for n in self.head_names}
        self._fingerprint = ""

    @property
    def fingerprint(self) -> str:
        """Hash of the frozen base weights and the adapted module paths (computed once).

        Tasks and updates carry it, so an update trained on another base is rejected.
        """
        if not self._fingerprint:
            h = hashlib.sha256(repr(sorted(self.layers)).encode())
            for name, p in sorted(self.model.named_parameters()):
                if name.endswith(("lora_A", "lora_B")) or name in self._head:
                    continue
                h.update(name.encode())
                h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @property
    def fan_in_fan_out(self) -> bool:
        """True when the adapted layers store their weight transposed (GPT-2's Conv1D)."""
        return all(isinstance(layer.base, Conv1D) for layer in self.layers.values())

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: layer.shape for n, layer in self.layers.items()}

    @property
    def device(self) -> torch.device:
        """Where the model computes (its first parameter's device)."""
        return next(self.model.parameters()).device

    def head_state(self) -> dict[str, Tensor]:
        """The head's parameters, on the CPU (what an update carries)."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self._head.items()}

    def load(self, task: ClientTask, train_head: bool = True) -> None:
        """Put a task's factors, scale, frozen delta and head into the model."""
        if set(task.factors) != set(self.layers):
            missing = sorted(set(self.layers) - set(task.factors))[:3]
            extra = sorted(set(task.factors) - set(self.layers))[:3]
            raise ValueError(f"task modules do not match the model: missing {missing}, extra {extra}")
        for name, layer in self.layers.items():
            layer.set_factors(task.factors[name], task.scale, task.freeze_A)
            layer.set_delta(task.base_delta.get(name))
        self.load_head(task.head)
        for p in self._head.values():
            p.requires_grad_(train_head)

    def load_head(self, head: dict[str, Tensor]) -> None:
        """Copy ``head``'s tensors into the head parameters of the same names."""
        with torch.no_grad():
            for n, t in head.items():
                self._head[n].copy_(t)

    def factors(self) -> LoRAState:
        return {n: layer.factors() for n, layer in self.layers.items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]
