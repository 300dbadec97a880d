"""Nothing in src/fedlora can deserialise executable data: an AST walk that resolves every
import alias, so `import pickle as p`, `from torch import load as l`, `getattr(torch, "load")`
or `__import__("marshal")` are caught where a text search would miss them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "fedlora"
# modules whose loading runs code embedded in the data
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
# functions that unpickle (torch.load even with weights_only=True: nothing in src should need it)
UNSAFE_NAMES = {"torch.load", "torch.serialization.load", "torch.jit.load", "pandas.read_pickle",
                "numpy.lib.format.read_array"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it stands for, from every absolute import in the file."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:  # `import a.b` binds a; `import a.b as c` binds c to a.b
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`x.y.z` with its first name resolved through the imports (None for anything else)."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    if isinstance(node, ast.Call) and _is(node.func, "getattr", aliases) and len(node.args) >= 2:
        base, attr = _dotted(node.args[0], aliases), node.args[1]
        if base and isinstance(attr, ast.Constant) and isinstance(attr.value, str):
            return f"{base}.{attr.value}"
    return None


def _is(node: ast.AST, name: str, aliases: dict[str, str]) -> bool:
    return _dotted(node, aliases) == name


def _unsafe(name: str) -> bool:
    return name in UNSAFE_NAMES or name.split(".")[0] in UNSAFE_MODULES


def unsafe_uses(source: str) -> list[str]:
    """``line N: what`` for every import, reference or call in ``source`` that can unpickle."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    hits: set[tuple[int, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            hits.update((node.lineno, f"import {a.name}") for a in node.names if _unsafe(a.name))
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            hits.update((node.lineno, f"from {node.module} import {a.name}") for a in node.names
                        if _unsafe(f"{node.module}.{a.name}"))
        elif isinstance(node, (ast.Name, ast.Attribute)) or isinstance(node, ast.Call) and _is(
                node.func, "getattr", aliases):
            name = _dotted(node, aliases)
            if name and _unsafe(name):
                hits.add((node.lineno, name))
        if isinstance(node, ast.Call):
            dynamic = _is(node.func, "__import__", aliases) or _is(node.func, "importlib.import_module", aliases)
            arg = node.args[0] if node.args else None
            if dynamic and isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _unsafe(arg.value):
                hits.add((node.lineno, f"imports {arg.value}"))
            for kw in node.keywords:  # allow_pickle only if literally False; weights_only never False
                literal = kw.value.value if isinstance(kw.value, ast.Constant) else None
                if kw.arg == "allow_pickle" and literal is not False or kw.arg == "weights_only" and literal is False:
                    hits.add((node.lineno, f"{kw.arg}={ast.unparse(kw.value)}"))
    return [f"line {n}: {what}" for n, what in sorted(hits)]


EVASIONS = {
    "import": "import pickle",
    "aliased import": "import pickle as p\np.loads(b'')",
    "Unpickler": "from pickle import Unpickler\nUnpickler(f).load()",
    "C pickle": "import _pickle",
    "marshal": "import marshal",
    "marshal via from": "from marshal import loads as ml",
    "dill": "import dill",
    "shelve": "import shelve",
    "joblib": "from joblib import load",
    "torch.load": "import torch\ntorch.load(f)",
    "aliased torch.load": "import torch as T\nT.load(f, weights_only=True)",
    "torch.load renamed": "from torch import load as read\nread(f)",
    "torch.load kept in a variable": "import torch\nreader = torch.load\nreader(f)",
    "torch.serialization": "import torch.serialization as ser\nser.load(f)",
    "getattr": "import torch\ngetattr(torch, 'load')(f)",
    "__import__": "__import__('pickle').loads(b'')",
    "importlib": "import importlib\nimportlib.import_module('marshal')",
    "numpy allow_pickle": "import numpy as np\nnp.load(f, allow_pickle=True)",
    "allow_pickle from a variable": "import numpy as np\nnp.load(f, allow_pickle=flag)",
    "weights_only=False anywhere": "loader(f, weights_only=False)",
    "pandas": "import pandas as pd\npd.read_pickle(f)",
}


@pytest.mark.parametrize("source", EVASIONS.values(), ids=EVASIONS.keys())
def test_the_guard_catches_each_way_of_unpickling(source):
    assert unsafe_uses(source)


def test_the_guard_passes_safe_loading():
    safe = ("import json, numpy as np\nfrom safetensors.torch import load_file\nfrom . import state\n"
            "json.load(f)\nnp.load(f)\nnp.load(f, allow_pickle=False)\nload_file(p)\nstate.load(x)\n"
            "torch_load = 'torch.load'  # a string, not a reference\n")
    assert unsafe_uses(safe) == []


def test_nothing_in_src_deserialises_executable_data():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 40  # the walk sees the package
    hits = [f"{p.relative_to(PACKAGE)}: {h}" for p in files for h in unsafe_uses(p.read_text())]
    assert not hits
