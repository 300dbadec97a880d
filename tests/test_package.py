"""fedlora is a regular package with a version: one ``__init__.py``, ``fedlora --version``."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import fedlora
from fedlora.cli import main
from fedlora.config import default_config_path

SRC = Path(__file__).resolve().parents[1] / "src"


def test_fedlora_is_a_regular_package_not_a_namespace():
    # a namespace package has no __file__ and a search path that any `fedlora` folder on sys.path joins
    assert fedlora.__file__ == str(SRC / "fedlora" / "__init__.py")
    assert list(fedlora.__path__) == [str(SRC / "fedlora")]
    assert default_config_path().is_file()  # the package data sits beside the modules


def test_the_version_is_the_installed_distributions_and_the_pyprojects():
    assert fedlora.__version__ == importlib.metadata.version("fedlora") == fedlora._source_version()
    assert fedlora.__version__ != "unknown"


def test_fedlora_version_prints_it(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fedlora {fedlora.__version__}"


def test_importing_from_a_checkout_prints_the_package_path(tmp_path):
    """`python -c "import fedlora; print(fedlora.__file__)"` from a directory holding a stray
    `fedlora` folder: the real package wins whole (no merged namespace)."""
    (tmp_path / "fedlora").mkdir()
    (tmp_path / "fedlora" / "stray.py").write_text("")
    code = "import fedlora, importlib.util; print(fedlora.__file__); print(importlib.util.find_spec('fedlora.stray'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(SRC), "PATH": ""}).stdout.split()
    assert out == [str(SRC / "fedlora" / "__init__.py"), "None"]
