"""LoRA on any ``nn.Linear``: a wrapper whose rank and scale the strategy sets each round.

The layer never derives its scale from its own rank: a client that trains a sketched
rank-``k`` block of a rank-``r`` adapter must use the strategy's ``s * r / k``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .types import ClientTask, Factors, LoRAState


class LoRALinear(nn.Module):
    """``y = base(x) + scale * dropout(x) @ A.T @ B.T  [+ x @ A_d.T @ B_d.T]``."""

    def __init__(self, base: nn.Linear, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = 0.0
        out_f, in_f = base.weight.shape
        # LoRA weights stay float32 over a bf16/fp16 base (as PEFT does): small, and exact.
        low = base.weight.dtype in (torch.bfloat16, torch.float16)
        self.lora_dtype = torch.float32 if low else base.weight.dtype
        self.lora_A = nn.Parameter(base.weight.new_zeros(0, in_f, dtype=self.lora_dtype))  # (r, in)
        self.lora_B = nn.Parameter(base.weight.new_zeros(out_f, 0, dtype=self.lora_dtype))  # (out, r)
        # Frozen low-rank delta merged "into the base" by strategies such as FLoRA.
        self.register_buffer("delta_A", base.weight.new_zeros(0, in_f, dtype=self.lora_dtype), persistent=False)
        self.register_buffer("delta_B", base.weight.new_zeros(out_f, 0, dtype=self.lora_dtype), persistent=False)

    @property
    def shape(self) -> tuple[int, int]:
        out_f, in_f = self.base.weight.shape
        return out_f, in_f

    def set_factors(self, f: Factors, scale: float, freeze_A: bool = False) -> None:
        """Load a pair of any rank (copied, so the caller's tensors are never trained)."""
        if f.shape != self.shape:
            raise ValueError(f"factors of shape {f.shape} do not fit a layer of shape {self.shape}")
        self.lora_A = nn.Parameter(f.A.detach().to(self.lora_dtype).clone(), requires_grad=not freeze_A)
        self.lora_B = nn.Parameter(f.B.detach().to(self.lora_dtype).clone())
        self.scale = float(scale)

    def set_delta(self, f: Factors | None) -> None:
        out_f, in_f = self.shape
        w = self.base.weight
        dt = self.lora_dtype
        self.delta_A = w.new_zeros(0, in_f, dtype=dt) if f is None else f.A.detach().to(dt).clone()
        self.delta_B = w.new_zeros(out_f, 0, dtype=dt) if f is None else f.B.detach().to(dt).clone()

    def factors(self) -> Factors:
        return Factors(A=self.lora_A.detach().clone(), B=self.lora_B.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        xf = x.to(self.lora_dtype)
        if self.lora_A.shape[0] > 0:
            y = y + ((self.dropout(xf) @ self.lora_A.T @ self.lora_B.T) * self.scale).to(y.dtype)
        if self.delta_A.shape[0] > 0:
            y = y + (xf @ self.delta_A.T @ self.delta_B.T).to(y.dtype)
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
    """Wrap every ``nn.Linear`` whose path matches ``targets``; freeze the rest of the model.

    Returns module path -> wrapper, in model order. Raises if nothing matches, naming
    a few linear layers the user could have meant.
    """
    targets = list(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
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

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: layer.shape for n, layer in self.layers.items()}

    def head_state(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self._head.items()}

    def load(self, task: ClientTask, train_head: bool = True) -> None:
        """Put a task's factors, scale, frozen delta and head into the model."""
        if set(task.factors) != set(self.layers):
            missing = sorted(set(self.layers) - set(task.factors))[:3]
            extra = sorted(set(task.factors) - set(self.layers))[:3]
            raise ValueError(f"task modules do not match the model: missing {missing}, extra {extra}")
        for name, layer in self.layers.items():
            layer.set_factors(task.factors[name], task.scale, task.freeze_A)
            layer.set_delta(task.base_delta.get(name))
        with torch.no_grad():
            for n, t in task.head.items():
                self._head[n].copy_(t)
        for p in self._head.values():
            p.requires_grad_(train_head)

    def factors(self) -> LoRAState:
        return {n: layer.factors() for n, layer in self.layers.items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]
