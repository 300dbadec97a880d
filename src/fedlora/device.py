"""Where a run's tensors live and in which precision they compute.

``train.device`` names the device (``auto``: CUDA, else Apple's MPS, else the CPU);
``train.precision`` chooses autocast for the forward pass and the loss (``bf16`` or
``fp16``, the latter with a gradient scaler). LoRA factors and optimiser state stay fp32
whatever the precision; ``fp32`` adds nothing to the computation, so CPU results are the
same bit for bit as without this module.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Literal

import torch
from torch import Tensor

from .errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_device_name(key: str, name: str) -> None:
    if not DEVICE_PATTERN.fullmatch(name):
        raise ConfigError(f"{key}: must be auto, cpu, cuda, cuda:N or mps; got {name!r}")


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """The torch device ``name`` means on this machine; one line naming ``key`` if it has none."""
    check_device_name(key, name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"{key}={name}: CUDA is not available on this machine ({why}); "
                              f"use {key}=auto or {key}=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{key}={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not _mps_available():
        raise ConfigError(f"{key}={name}: Apple's MPS backend is not available on this machine")
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """Autocast of the forward pass and loss at ``precision`` (nothing at all for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST[precision])


def grad_scaler(device: torch.device, precision: Precision) -> torch.amp.GradScaler:
    """A loss scaler for fp16 (its range needs one); a disabled pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """A batch on ``device`` (no copy when it is already there)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def windows(batches: Iterable[dict[str, Tensor]], size: int) -> Iterator[list[dict[str, Tensor]]]:
    """Consecutive groups of ``size`` micro-batches: one optimiser step each (gradient accumulation)."""
    window: list[dict[str, Tensor]] = []
    for b in batches:
        window.append(b)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def gpu_peak_gib(device: torch.device) -> float | None:
    """Peak CUDA memory allocated since the last reset, in GiB (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
