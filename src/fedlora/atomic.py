"""Crash-safe writes: a temp file (or folder) beside the target, fsynced, renamed over it.

A crash leaves the old content or the new, never a torn mix; an error (a full disk, Ctrl-C)
removes the temp, so a failed write leaves nothing behind. Temp names end in ``.tmp<pid>``
(``.tmp-old<pid>`` for a folder being replaced); :func:`remove_temps` clears those a killed
process left, and must only run while the directory's lock is held.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

TEMP = re.compile(r"\.tmp(-old)?\d+$")


def temp_path(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f"{path.name}.{kind}{os.getpid()}")


def write_atomic(path: Path, data: bytes | str, pause: float = 0.0) -> None:
    """Replace ``path`` by ``data`` atomically and durably.

    Args:
        pause: seconds to wait halfway through the write (fault injection for tests).
    """
    data = data.encode() if isinstance(data, str) else data
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data[:len(data) // 2])
            if pause:
                f.flush()
                time.sleep(pause)
            f.write(data[len(data) // 2:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temp folder to fill; when the block ends it replaces ``final`` (an old
    ``final`` is removed), when the block raises it is removed and ``final`` is untouched.

    Two renames: a crash between them leaves no ``final`` (and a ``.tmp-old`` copy of the old one).
    """
    tmp, old = temp_path(final), temp_path(final, "tmp-old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_temps(directory: Path) -> None:
    """Delete the temp files and folders of interrupted writes in ``directory``."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if TEMP.search(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif TEMP.search(p.name):
            p.unlink(missing_ok=True)


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
