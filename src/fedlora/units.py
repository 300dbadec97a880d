"""Byte counts as a config writes them: an int, or a size with a decimal or binary unit."""

from __future__ import annotations

import re

from .errors import ConfigError

# decimal (SI) and binary units; FlowerTune's "200,000 MB" budget is counted in MiB (1024**2 bytes)
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str, key: str = "federation.max_total_bytes") -> int:
    """A byte count: an int, or a string such as ``"200GB"`` (10^9) or ``"200000 MiB"`` (2^20)."""
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0 (0: no budget), got {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
    unit = m and m.group(2).lower()
    if not m or unit not in UNITS:
        raise ConfigError(f"{key}: expected a number of bytes or a size like \"200GB\" or \"200000MiB\" "
                          f"(units: kB MB GB TB, KiB MiB GiB TiB), got {value!r}")
    return int(float(m.group(1)) * UNITS[unit])
