"""The package's import graph: no module imports one that imports it back, at module level or inside a function
(one owner per rule: engines.py runs models, predict.py loads runs, export.py and guard.py sit on either side)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "skincancer"


def import_graph() -> dict[str, set[str]]:
    """Each module's imports of the package's own modules (`from .x import`, `from . import x`, `skincancer.x`)."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("skincancer."):
                imported.add(node.module.split(".")[1])
        graph[path.stem] = (imported & modules) - {path.stem, "__init__"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: every path from a module back to itself, each found once (from its first module)."""
    found, order = [], sorted(graph)
    for start in order:
        stack = [(start, [start])]
        while stack:
            module, path = stack.pop()
            for nxt in sorted(graph[module]):
                if nxt == start:
                    found.append(path)
                elif nxt not in path and order.index(nxt) > order.index(start):
                    stack.append((nxt, [*path, nxt]))
    return found


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert {"predict", "export", "guard", "engines", "images"} <= set(graph)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check can fail
    assert cycles(graph) == []
