"""The import graph of vlm_rl and reward_models, read from the source (ast, every import statement, inside functions
too): no circles between modules, and vlm_rl/algorithms/ imports torch and the standard library only (docs/design.md)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vlm_rl", "reward_models")
ALGORITHMS = "vlm_rl.algorithms"


def module_files(root: Path = REPO) -> dict[str, Path]:
    """{dotted module name: file} of every module of the packages (a package is its __init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(path: Path, module: str, is_package: bool) -> set[str]:
    """Every dotted name an import statement of `path` names (a `from X import y` names both X and X.y)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """{module: the modules of the packages it imports} (a name that is not a module counts as its package)."""
    files = module_files(root)
    graph = {}
    for module, path in files.items():
        targets = set()
        for name in imported_names(path, module, path.name == "__init__.py"):
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself): Tarjan's."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_circle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions_and_relative_ones(tmp_path):
    (tmp_path / "vlm_rl").mkdir()
    (tmp_path / "reward_models").mkdir()
    (tmp_path / "vlm_rl" / "__init__.py").write_text("")
    (tmp_path / "reward_models" / "__init__.py").write_text("")
    (tmp_path / "vlm_rl" / "a.py").write_text("def f():\n    from vlm_rl.b import g\n")
    (tmp_path / "vlm_rl" / "b.py").write_text("from . import a\n")
    assert cycles(import_graph(tmp_path)) == [["vlm_rl.a", "vlm_rl.b"]]


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles (each a set of modules that import each other): " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("module", sorted(m for m in module_files() if m.startswith(ALGORITHMS)))
def test_algorithms_import_torch_and_themselves_only(module):
    path = module_files()[module]
    allowed_roots = {"torch", "__future__", *sys.stdlib_module_names}
    for name in imported_names(path, module, path.name == "__init__.py"):
        root = name.split(".")[0]
        assert root in allowed_roots or name.startswith(ALGORITHMS), f"{path.relative_to(REPO)} imports {name}: algorithms/ holds pure tensor functions (torch only)"
