"""The package's import graph: no import circle anywhere in ``interlock/``, and the layers that
find and route to workers (discovery, wire, actors, the pipeline) import no engine kind; they
build engines through `interlock.engines.engine_from_record` only.

The graph is read from the source, as ``shared/tools/import_cycles.py`` reads it: every
``import`` counts, at module level, inside functions and under ``if TYPE_CHECKING:`` alike
(an import that does not run still ties the design together)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "interlock"

#: The engine kinds' packages: only the factory's builders (`interlock.engines._kinds`), the
#: command line and the kinds themselves may import them.
KINDS = ("interlock.engines.mock", "interlock.engines.remote", "interlock.engines.openai")
#: Layers that must reach every kind through the factory.
KIND_BLIND = ("interlock.discovery", "interlock.wire", "interlock.actors", "interlock._pipeline")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_names(path: Path, name: str) -> set[str]:
    """Every module name ``path`` imports, and for ``from m import x`` also ``m.x`` (which is
    a module when ``x`` is a submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    base = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                package = base
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                target = f"{package}.{node.module}" if node.module else package
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each module of the package -> the modules of the package it imports (by the longest
    module name an imported name starts with)."""
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for target in _imported_names(path, name):
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_circle_finder_finds_circles_and_only_circles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": set(), "f": {"f"}}
    assert import_circles(graph) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_there_is_no_import_circle_in_the_package() -> None:
    graph = import_graph()
    assert "interlock.engines._factory" in graph and "interlock.discovery._etcd" in graph
    circles = import_circles(graph)
    assert circles == [], "import circles (a lower layer imports a higher one): " + "; ".join(
        " -> ".join(circle) for circle in circles
    )


def test_discovery_wire_actors_and_the_pipeline_import_no_engine_kind() -> None:
    graph = import_graph()
    leaks = sorted(
        f"{name} imports {target}"
        for name, targets in graph.items()
        if _within(name, KIND_BLIND)
        for target in targets
        if _within(target, KINDS)
    )
    assert leaks == [], "build engines with interlock.engines.engine_from_record: " + str(leaks)


def test_the_factory_imports_no_engine_kind() -> None:
    graph = import_graph()
    for name in ("interlock.engines", "interlock.engines._factory", "interlock.engines._record"):
        assert not {t for t in graph[name] if _within(t, KINDS)}, name
