"""Every shipped config in configs/ loads and validates."""

from pathlib import Path

import pytest

from fedlora.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    load_config(path)
