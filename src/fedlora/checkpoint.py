"""Crash-safe server checkpoints: safetensors + JSON, checksummed; nothing executable is loaded.

A checkpoint is one safetensors file, ``ckpt-<round>.safetensors``. The payload (nested
dicts and lists of tensors and JSON scalars) is flattened: its tensors are stored under
their paths (``server/strategy/factors/<module>/A``), the rest of its structure is JSON in
the file's metadata (``fedlora``, a tensor written there as ``{"$tensor": path}``), and
``sha256`` covers both. Loading parses JSON and raw tensor bytes only, never a pickle, so a
crafted file can at worst be refused; the checksum (keyless) finds torn or corrupted files.

The file is written to a temp file, fsynced, renamed over its final name, and the directory
is fsynced, so a crash leaves the old or the new file, never a torn one. The newest ``keep``
are kept. A file that does not verify (truncated, tampered, not safetensors, or an old
pickle-based ``ckpt-*.pt``, which is never opened) is skipped with a warning in favour of the
one before it; when none verifies, :func:`latest_checkpoint` refuses (a ConfigError: exit 2).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import reprlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from .atomic import write_atomic
from .errors import ConfigError

PATTERN = re.compile(r"ckpt-(\d{6})\.(safetensors|pt)$")  # .pt: the old pickle format, refused
TENSOR = "$tensor"
# Fault injection for tests: seconds to pause halfway through writing the temp file,
# which widens the window in which a kill lands inside a write.
WRITE_DELAY_ENV = "FEDLORA_CHECKPOINT_WRITE_DELAY"


class CorruptCheckpoint(Exception):
    pass


def checkpoint_path(directory: Path, rnd: int) -> Path:
    return directory / f"ckpt-{rnd:06d}.safetensors"


def flatten(payload: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON structure, tensors by path) of a nested dict/list of tensors and JSON scalars.

    Tensors are copied to contiguous CPU tensors; tuples become lists. Anything else
    (a dataclass, a ``Factors``, a numpy scalar) is a TypeError naming its path.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            if path in tensors:
                raise ValueError(f"checkpoint: two tensors at the path {path!r} (a key holding '/')")
            tensors[path] = x.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            return {TENSOR: path}
        if isinstance(x, dict):
            for k in x:
                if not isinstance(k, str) or k == TENSOR:
                    raise TypeError(f"checkpoint: {path or 'payload'} has the key {k!r}; keys must be strings")
            return {k: walk(v, f"{path}/{k}" if path else k) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"checkpoint: {path} is a {type(x).__name__}; a state_dict holds only dicts, lists, "
                        "tensors and str/int/float/bool/None (fedlora.state.to_plain turns factors into dicts)")

    return walk(payload, ""), tensors


def unflatten(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(structure, dict):
        if set(structure) == {TENSOR}:
            return tensors[structure[TENSOR]]
        return {k: unflatten(v, tensors) for k, v in structure.items()}
    if isinstance(structure, list):
        return [unflatten(v, tensors) for v in structure]
    return structure


def _digest(structure: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(structure.encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def encode(payload: dict) -> bytes:
    """The bytes of a checkpoint file (a safetensors file with the structure in its metadata)."""
    structure, tensors = flatten(payload)
    text = json.dumps(structure, separators=(",", ":"))
    return save(tensors, metadata={"fedlora": text, "sha256": _digest(text, tensors)})


def decode(data: bytes, name: str = "checkpoint") -> dict:
    """Inverse of :func:`encode`; CorruptCheckpoint when ``data`` does not verify."""
    try:
        tensors = load(data)  # safetensors' own parser checks the header against the length
        meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
        text, digest = meta["fedlora"], meta["sha256"]
    except Exception as e:  # any failure to parse untrusted bytes means "not a checkpoint"
        raise CorruptCheckpoint(f"{name}: not a fedlora checkpoint or truncated ({str(e)[:80]})") from None
    if _digest(text, tensors) != digest:
        raise CorruptCheckpoint(f"{name}: checksum mismatch (truncated or corrupted)")
    try:
        payload = unflatten(json.loads(text), tensors)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise CorruptCheckpoint(f"{name}: malformed structure ({e})") from None
    if not isinstance(payload, dict):
        raise CorruptCheckpoint(f"{name}: malformed structure (a JSON {type(payload).__name__}, not a table)")
    return payload


def state_misfit(state: Any, reference: Any) -> str | None:
    """Why ``state`` cannot be loaded where ``reference`` (a fresh object's state_dict) was taken: the
    first tensor of the reference that ``state`` lacks or holds in another shape or dtype; None when
    every one fits. Tensors only the state holds (e.g. what rounds accumulate) are not compared."""
    try:
        _, have = flatten(state)
    except (TypeError, ValueError) as e:
        return f"malformed state ({e})"
    for key, want in flatten(reference)[1].items():
        got = have.get(key)
        if got is None:
            return f"it holds no tensor {key}"
        if got.shape != want.shape or got.dtype != want.dtype:
            return (f"{key} is {tuple(got.shape)} {got.dtype} there, {tuple(want.shape)} {want.dtype} in this run "
                    "(another rank or model?)")
    return None


def save_checkpoint(directory: Path, rnd: int, payload: dict, keep: int = 2) -> Path:
    """Atomically write the checkpoint of round ``rnd``; prune all but the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, rnd)
    write_atomic(final, encode(payload), pause=float(os.environ.get(WRITE_DELAY_ENV, "0") or 0))
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def read_checkpoint(path: Path) -> dict:
    if path.suffix == ".pt":  # never opened: unpickling it could run code
        raise CorruptCheckpoint(f"{path.name}: an old pickle-based checkpoint, which fedlora no longer loads")
    return decode(path.read_bytes(), path.name)


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, oldest first (leftover temp files are ignored)."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p.name, p) for p in directory.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, _, p in sorted(found)]


def latest_checkpoint(directory: Path, misfit: Callable[[dict], str | None] | None = None) -> tuple[int, dict] | None:
    """(round, payload) of the newest checkpoint that verifies, with a warning for each newer
    one skipped; None when there is none; a ConfigError when there are some but none verifies.

    A checksum is keyless: it finds damage, not a crafted file. So a payload whose ``round`` is not
    its file name's (a renamed file) is skipped too, and so is one that ``misfit`` (the reason a
    payload cannot be this run's, or None) refuses.
    """
    skipped: list[str] = []
    for path in reversed(list_checkpoints(directory)):
        rnd = int(PATTERN.match(path.name).group(1))
        try:
            payload = read_checkpoint(path)
            said = payload.get("round", rnd)
            if said != rnd or type(said) is not int:
                raise CorruptCheckpoint(f"{path.name}: its payload is round {reprlib.repr(said)} (renamed?)")
            if misfit is not None and (why := misfit(payload)):
                raise CorruptCheckpoint(f"{path.name}: {why}")
        except CorruptCheckpoint as e:
            skipped.append(str(e))
            continue
        for reason in skipped:
            warnings.warn(f"skipping checkpoint {reason}; using {path.name}", stacklevel=2)
        return rnd, payload
    if skipped:
        raise ConfigError(f"no usable checkpoint in {directory}: {'; '.join(skipped)}; "
                          "pass --overwrite instead of --resume to start the run afresh")
    return None
