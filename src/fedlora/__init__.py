"""fedlora: federated LoRA fine-tuning of language models across clients of unequal rank budgets.

A regular package (not a namespace one), so a stray ``fedlora`` folder elsewhere on the path
cannot merge into it. Importing it loads nothing heavy: the modules are imported where used.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _source_version() -> str:
    """The version in the source tree's pyproject.toml (a checkout on the path, not installed)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(Path(__file__).resolve().parents[2] / "pyproject.toml", "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "unknown"


try:
    __version__ = version("fedlora")
except PackageNotFoundError:
    __version__ = _source_version()
