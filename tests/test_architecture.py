"""The layering of docs/ARCHITECTURE.md holds: workflows on top, no cycles, no config or tracking code in reid/."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

REID = Path(__file__).resolve().parents[1] / "reid"


@functools.cache
def _imports() -> dict[str, set[str]]:
    """Return {module: the reid modules it imports}, for every module under reid/ but the package's own lazy API."""
    graph = {}
    for path in sorted(REID.rglob("*.py")):
        name = ".".join(("reid", *path.relative_to(REID).with_suffix("").parts)).removesuffix(".__init__")
        if name == "reid":
            continue
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = found
    return graph


def test_nothing_in_the_library_imports_the_workflows() -> None:
    offenders = {
        module: sorted(i for i in imported if i.startswith("reid.workflows"))
        for module, imported in _imports().items()
        if not module.startswith("reid.workflows")
    }
    assert {m: i for m, i in offenders.items() if i} == {}


@pytest.mark.parametrize("banned", ["hydra", "omegaconf", "wandb"])
def test_the_library_does_not_import_config_or_tracking_code(banned: str) -> None:
    offenders = [m for m, imported in _imports().items() if any(i.split(".")[0] == banned for i in imported)]
    assert offenders == []


def test_the_import_graph_has_no_cycles() -> None:
    modules = _imports()
    graph = {m: {i for i in imported if i in modules} for m, imported in modules.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dependency in sorted(graph[module]):
            assert state.get(dependency) != "open", " -> ".join([*path, module, dependency])
            if dependency not in state:
                visit(dependency, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
