"""The repository is a Flower app one can build and install: a LICENSE, flwr as a tested range,
and `flwr build` makes a FAB holding the package's sources (what a SuperLink installs)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from fedlora.config.loader import tomllib

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_the_apache_2_text_the_project_declares():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert pyproject()["project"]["license"] == {"file": "LICENSE"}


def test_flwr_is_a_range_whose_lower_bound_is_the_tested_version():
    import flwr

    p = pyproject()
    deps = [Requirement(d) for d in p["project"]["dependencies"]] + [
        Requirement(d) for d in p["project"]["optional-dependencies"]["flower"]]
    flwr_reqs = [r for r in deps if r.name == "flwr"]
    assert len(flwr_reqs) == 2
    target = Version(p["tool"]["flwr"]["app"]["flwr-version-target"])
    for r in flwr_reqs:
        ops = {s.operator for s in r.specifier}
        assert ">=" in ops and "==" not in ops  # a range (the FAB format refuses a pin)
        assert Version(flwr.__version__) in r.specifier and target in r.specifier
        assert Version(next(s.version for s in r.specifier if s.operator == ">=")) <= Version(flwr.__version__)


@pytest.mark.skipif(not (BIN / "flwr").exists(), reason="flwr CLI not installed")
def test_flwr_build_makes_a_fab_holding_the_package(tmp_path):
    app = tmp_path / "fedlora"  # a valid app name (the checkout's own folder name may not be)
    app.mkdir()
    for name in ("pyproject.toml", "LICENSE", "README.md"):
        shutil.copy(ROOT / name, app / name)
    shutil.copytree(ROOT / "src" / "fedlora", app / "src" / "fedlora", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([str(BIN / "flwr"), "build", "--app", str(app)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    (fab,) = tmp_path.glob("fedlora.fedlora.*.fab")
    names = set(zipfile.ZipFile(fab).namelist())
    pkg = ROOT / "src" / "fedlora"
    expected = {f"src/fedlora/{p.relative_to(pkg)}" for p in pkg.rglob("*.py")}
    assert expected <= names  # every module of the package, so the SuperLink can install it
    assert {"pyproject.toml", "LICENSE", "README.md", "src/fedlora/configs/default.toml", ".info/CONTENT"} <= names
    assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in names)
