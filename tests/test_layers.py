"""The package's layering: no import cycle between lorakit's subpackages and top-level modules.

Every ``import`` / ``from ... import`` in lorakit/ counts, at module level or inside a function (a lazy import is
still a dependency), except those under ``if TYPE_CHECKING:``. Each node is a subpackage (``lorakit.hosts``) or a
top-level module (``lorakit.inject``); the graph between nodes must be acyclic, so the layers of
docs/architecture.md stay layers.
"""
from __future__ import annotations

import ast
from pathlib import Path

import lorakit

ROOT = Path(lorakit.__file__).parent


def _node(module: str) -> str | None:
    """``lorakit.hosts.host`` -> ``hosts``; ``lorakit.inject`` -> ``inject``; the package itself -> ``None``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "lorakit" else None


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return skip


def import_graph() -> dict[str, dict[str, list[str]]]:
    """node -> {imported node: [the importing modules]}, for every lorakit module."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_of(path)
        source = _node(module)
        if source is None:
            continue  # lorakit/__init__.py re-exports the public API from every layer
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        skip = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    targets = [".".join(base + ([node.module] if node.module else []))]
                else:
                    targets = [node.module or ""]
                if targets[0] == "lorakit":  # from lorakit import x / from .. import x: x is the node
                    targets = [f"lorakit.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                dest = _node(target)
                if dest is not None and dest != source:
                    graph.setdefault(source, {}).setdefault(dest, []).append(module)
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_subpackages():
    graph = import_graph()
    assert "hosts" in graph and "methods" in graph["inject"]  # the walk sees the package
    report = []
    for component in cycles(graph):
        edges = [f"{a} -> {b} ({', '.join(sorted(set(graph[a][b]))[:3])})"
                 for a in component for b in component if b in graph.get(a, {})]
        report.append(f"cycle {component}: " + "; ".join(edges))
    assert not report, "\n".join(report)


def test_the_cycle_check_sees_a_cycle():
    graph = {"a": {"b": ["lorakit.a.x"]}, "b": {"c": ["lorakit.b.y"]}, "c": {"a": ["lorakit.c.z"]}, "d": {"a": []}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_bottom_layers_import_nothing_above_them():
    """The core, the hooks protocol, kernels and routing import only the layers below them."""
    graph = import_graph()
    allowed = {"errors": set(), "registry": {"errors"}, "config": {"errors"},
               "hooks": {"errors", "registry", "config"}, "kernels": {"errors"},
               "routing": {"errors", "registry", "config", "kernels"}}
    for node, below in allowed.items():
        assert set(graph.get(node, {})) <= below, f"{node} imports {sorted(set(graph[node]) - below)}"
