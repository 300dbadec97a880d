"""Every shipped file in configs/ loads and validates (run configs and device lists)."""

from pathlib import Path

import pytest

from fedlora.config import load_config
from fedlora.plan import read_devices

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.toml") if not p.name.startswith("devices"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_run_config_is_valid(path):
    load_config(path)


def test_shipped_device_lists_are_valid():
    for path in CONFIGS.glob("devices*.toml"):
        assert read_devices(path)
