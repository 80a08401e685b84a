"""proxyd's top-level modules import each other without a loop (type-only imports included).

A loop means two modules are one concept split in two, or a seam that should be an interface
(the master's admin port, config watcher and code upgrade talk to it through interfaces:
master_api.py, callbacks, upgrade.UpgradeHost).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "proxyd"


def _imports(path: Path) -> set[str]:
    """Top-level proxyd modules that ``path`` imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "proxyd" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_no_import_loop_among_top_level_modules() -> None:
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}
    loops: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        for nxt in sorted(graph[name]):
            if nxt in path:
                loops.append([*path[path.index(nxt):], nxt])
            elif len(path) < len(graph):
                visit(nxt, [*path, nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert not loops, f"import loops: {loops[:5]}"


def test_admin_and_watch_do_not_import_the_master() -> None:
    for name in ("admin", "watch", "master_api", "worker_process", "workers", "reconcile",
                 "upgrade", "handover", "shutdown"):
        assert "master" not in _imports(PACKAGE / f"{name}.py"), name
