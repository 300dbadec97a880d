"""Every shipped file in configs/ loads and validates (run configs and device lists)."""

from pathlib import Path

import pytest

from fedlora.config import load_config, read_toml
from fedlora.plan import read_devices
from fedlora.study.spec import load_study

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STUDY_DIR = CONFIGS / "study"
# a study file names its methods; every other TOML in configs/study is one task's run config
STUDIES = sorted(p for p in STUDY_DIR.glob("*.toml") if "methods" in read_toml(p))
RUN_CONFIGS = sorted([p for p in CONFIGS.glob("*.toml") if not p.name.startswith("devices")]
                     + [p for p in STUDY_DIR.glob("*.toml") if p not in STUDIES])


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_run_config_is_valid(path):
    load_config(path)


def test_shipped_device_lists_are_valid():
    for path in CONFIGS.glob("devices*.toml"):
        assert read_devices(path)


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_shipped_study_file_is_valid(path):
    study = load_study(path)  # checks every task config and ablation variant too
    assert study.methods and study.seeds


def test_the_study_files_are_found():
    assert {"study.toml", "llm.toml", "full.toml"} <= {p.name for p in STUDIES}
