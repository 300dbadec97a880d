"""Crash-safe server checkpoints: atomic write, checksum on load, fall back to the previous.

A checkpoint file is ``MAGIC + sha256(payload) + payload`` where the payload is a
``torch.save`` of a plain dict. It is written to a temporary file, fsynced, renamed
over its final name, and the directory is fsynced, so a crash leaves either the old
or the new file, never a torn one. The last ``keep`` checkpoints are kept; a file that
fails its checksum is reported and skipped in favour of the one before it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
import warnings
from pathlib import Path

import torch

MAGIC = b"FEDLORA-CKPT-1\n"
PATTERN = re.compile(r"ckpt-(\d{6})\.pt$")
# Fault injection for tests: seconds to pause halfway through writing the temp file,
# which widens the window in which a kill lands inside a write.
WRITE_DELAY_ENV = "FEDLORA_CHECKPOINT_WRITE_DELAY"


class CorruptCheckpoint(Exception):
    pass


def checkpoint_path(directory: Path, rnd: int) -> Path:
    return directory / f"ckpt-{rnd:06d}.pt"


def save_checkpoint(directory: Path, rnd: int, payload: dict, keep: int = 2) -> Path:
    """Atomically write the checkpoint of round ``rnd``; prune all but the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    data = MAGIC + hashlib.sha256(body).digest() + body
    final = checkpoint_path(directory, rnd)
    tmp = final.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        half = len(data) // 2
        f.write(data[:half])
        delay = float(os.environ.get(WRITE_DELAY_ENV, "0") or 0)
        if delay:
            f.flush()
            time.sleep(delay)
        f.write(data[half:])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(directory)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def read_checkpoint(path: Path) -> dict:
    data = path.read_bytes()
    head = len(MAGIC) + 32
    if len(data) < head or not data.startswith(MAGIC):
        raise CorruptCheckpoint(f"{path.name}: not a fedlora checkpoint or truncated")
    digest, body = data[len(MAGIC):head], data[head:]
    if hashlib.sha256(body).digest() != digest:
        raise CorruptCheckpoint(f"{path.name}: checksum mismatch (truncated or corrupted)")
    return torch.load(io.BytesIO(body), weights_only=False)


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, oldest first (leftover temp files are ignored)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if PATTERN.match(p.name))


def latest_checkpoint(directory: Path) -> tuple[int, dict] | None:
    """(round, payload) of the newest checkpoint that verifies; warns about bad ones."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return int(PATTERN.match(path.name).group(1)), read_checkpoint(path)
        except CorruptCheckpoint as e:
            warnings.warn(f"skipping corrupt checkpoint {e}; using the previous one", stacklevel=2)
    return None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
