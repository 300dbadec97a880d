"""A run's output directory: one run at a time, a fresh start or a checked resume.

The lock is ``flock`` on ``.fedlora.lock`` in the directory: the kernel releases it when the
holder ends, however it ends (a crash or SIGKILL included), so no stale lock needs clearing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import reprlib
import stat
from collections.abc import Iterator
from pathlib import Path

from .atomic import remove_temps
from .checkpoint import list_checkpoints
from .config import RunConfig, config_changes, read_toml, toml_dict
from .errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - no flock (Windows): runs are not locked
    fcntl = None

SUMMARY = "summary.json"  # written last: its presence marks a finished run
LOCK = ".fedlora.lock"
PID_WIDTH = 20  # bytes of the pid record in the lock file
RUN_FILES = ("metrics.jsonl", "clients.json", SUMMARY, "checkpoints")  # names only a run writes


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``out`` for the block; while it is held, another holder is refused (ConfigError)."""
    out.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(out / LOCK)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, PID_WIDTH, 0).decode(errors="replace").strip() or "?"
                raise ConfigError(f"output directory {out} is in use by another run (pid {pid}); wait for it to "
                                  "end, or set output_dir=... to run elsewhere") from None
        os.pwrite(fd, f"{os.getpid():<{PID_WIDTH - 1}}\n".encode(), 0)  # fixed width: overwrites, never truncates
        yield
    finally:
        os.close(fd)  # releases the lock


def _open_lock(path: Path) -> int:
    """The lock file's descriptor; one line when ``path`` is anything but fedlora's own regular file: a planted
    symlink or hard link would otherwise have the pid written into (or truncate) the file it points at."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        why = "is a symbolic link" if e.errno == errno.ELOOP else f"cannot be opened ({e.strerror})"
        raise ConfigError(f"output directory {path.parent}: {LOCK} {why}; remove it, or set output_dir=...") from None
    st = os.fstat(fd)
    why = ("is not a regular file" if not stat.S_ISREG(st.st_mode) else
           f"has {st.st_nlink} hard links (another file shares it)" if st.st_nlink != 1 else "")
    if why:
        os.close(fd)
        raise ConfigError(f"output directory {path.parent}: {LOCK} {why}; remove it, or set output_dir=...")
    return fd


def holds_run(out: Path) -> bool:
    """True when ``out`` holds what a fedlora run writes: its outputs, or the resolved config.toml it writes
    first (every table present), left by a run that stopped before its first round."""
    if any((out / name).exists() for name in RUN_FILES):
        return True
    try:
        written = read_toml(out / "config.toml")
    except ConfigError:
        return False
    return {f.name for f in dataclasses.fields(RunConfig)} <= set(written)


def prepare_output_dir(out: Path, overwrite: bool, resume: bool) -> int:
    """Make ``out`` ready (its lock held); return 0 to start afresh, -1 to continue from its checkpoint."""
    has_run = (out / "metrics.jsonl").exists()
    out.mkdir(parents=True, exist_ok=True)
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if others and not overwrite and not holds_run(out):  # a fresh start deletes and replaces files of a run's names
        raise ConfigError(f"output directory {out} is not empty ({', '.join(others[:3])}"
                          f"{', ...' if len(others) > 3 else ''}) and holds no fedlora run; set output_dir=... to "
                          "an empty or new directory, or pass --overwrite to write into it")
    if has_run and not resume and not overwrite:
        raise ConfigError(f"output directory {out} already holds a run; pass --resume to "
                          "continue it, --overwrite to replace it, or set output_dir=...")
    for d in (out, out / "checkpoints"):  # no other run can be writing them: the lock is ours
        remove_temps(d)
    if has_run and resume:
        return -1
    for old in [out / "metrics.jsonl", out / SUMMARY, *list_checkpoints(out / "checkpoints")]:
        old.unlink(missing_ok=True)
    return 0


def changed_settings(cfg: RunConfig, out: Path) -> list[tuple[str, object, object]]:
    """(dotted key, value in ``out``/config.toml, value in ``cfg``) for every setting that differs
    (``output_dir`` aside: the same run may be found under another path)."""
    return [c for c in config_changes(toml_dict(cfg), read_toml(out / "config.toml")) if c[0] != "output_dir"]


def check_resume(cfg: RunConfig, out: Path) -> None:
    """Refuse to continue the run in ``out`` with settings other than its own ``config.toml``'s;
    only ``federation.rounds`` may grow (the run goes on to the new count)."""
    if not (out / "config.toml").is_file():
        raise ConfigError(f"--resume: {out} has no config.toml to check the settings against; "
                          "pass --overwrite to start afresh")
    # a cosine schedule is planned over the rounds: growing them would continue neither run's schedule
    may_grow = cfg.train.lr_schedule == "constant"
    changed = [(k, there, now) for k, there, now in changed_settings(cfg, out)
               if not (may_grow and k == "federation.rounds" and _grows(there, now))]
    if changed:
        named = ", ".join(f"{k} ({reprlib.repr(there)} there, {reprlib.repr(now)} now)" for k, there, now in changed)
        raise ConfigError(f"--resume: the run in {out} has other settings: {named}; resume with its own "
                          "(only federation.rounds may grow, under a constant learning rate), or pass --overwrite "
                          "to start afresh")


def _grows(there: object, now: object) -> bool:
    return isinstance(there, int) and isinstance(now, int) and now >= there
