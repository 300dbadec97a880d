"""The package's shape: no import cycles, carriers that import only the shared driver,
modules of one job (short), and one place per concern."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "fedlora"
MAX_LINES = 300


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Modules of ours that one ``from ... import ...`` statement reaches."""
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    out = []
    for alias in node.names:  # `from pkg import submodule` reaches the submodule itself
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in MODULES else target)
    return out


def imports_of(name: str) -> set[str]:
    """Every fedlora module ``name`` imports, wherever the import stands (inside functions
    and ``if TYPE_CHECKING:`` blocks too)."""
    path = MODULES[name]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.update(_resolve(name, path.name == "__init__.py", node))
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules on it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_walker_sees_relative_function_level_and_type_only_imports():
    assert "fedlora.config.schema" in GRAPH["fedlora.config.loader"]  # from .schema import ...
    assert "fedlora.strategies.fslora" in GRAPH["fedlora.strategies"]  # from . import fslora
    assert "fedlora.runner" in GRAPH["fedlora.cli"]  # imported inside a function


def test_no_import_cycle_in_the_package():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_the_flower_carrier_uses_the_shared_driver_not_the_cli_or_the_simulator():
    for name, deps in GRAPH.items():
        if name.startswith("fedlora.flower"):
            assert not deps & {"fedlora.cli", "fedlora.simulate"}, name


def test_the_strategies_know_nothing_of_configs_carriers_or_files():
    outer = {"fedlora.config", "fedlora.config.loader", "fedlora.config.schema", "fedlora.runner",
             "fedlora.experiment", "fedlora.cli", "fedlora.simulate", "fedlora.checkpoint"}
    for name, deps in GRAPH.items():
        if name.startswith("fedlora.strategies"):
            assert not deps & outer, (name, deps & outer)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_longer_than_300_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(SRC)} has {lines} lines: two ideas? split it"
