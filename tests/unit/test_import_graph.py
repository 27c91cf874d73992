"""The layering, checked on the source: clipjob's import graph (module-level and lazy imports alike) has no
cycle, and each layer imports only the layers below it (model/ is pure: no files, no training, no data)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "clipjob"

# layer -> what it may import from clipjob besides itself
ALLOWED = {
    "clipjob.errors": set(),
    "clipjob.fs": {"clipjob.errors"},
    "clipjob.model": {"clipjob.config", "clipjob.errors"},
    "clipjob.data": {"clipjob.config", "clipjob.errors", "clipjob.fs", "clipjob.hostmem"},  # hostmem: stdlib only
    "clipjob.checkpoint": {"clipjob.errors", "clipjob.fs", "clipjob.model"},
}


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the clipjob modules it imports anywhere in its body."""
    modules = {_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _in(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


def test_should_have_no_import_cycle():
    graph, done, path = import_graph(), set(), []

    def visit(m: str) -> None:
        if m in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for dep in sorted(graph[m]):
            visit(dep)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_should_import_only_lower_layers(layer):
    graph = import_graph()
    used = {dep for m, deps in graph.items() if _in(m, layer) for dep in deps if not _in(dep, layer)}
    unexpected = sorted(d for d in used if not any(_in(d, ok) for ok in ALLOWED[layer]))
    assert not unexpected, f"{layer} imports {unexpected}"


def test_should_find_a_cycle_and_a_layer_breach_when_there_is_one(monkeypatch):
    """The checks above can fail: a graph with model -> checkpoint -> model is caught."""
    graph = import_graph()
    graph["clipjob.model.convert"] = graph["clipjob.model.convert"] | {"clipjob.checkpoint"}
    monkeypatch.setitem(globals(), "import_graph", lambda: graph)
    with pytest.raises(pytest.fail.Exception, match="import cycle: .*clipjob.checkpoint"):
        test_should_have_no_import_cycle()
    with pytest.raises(AssertionError, match=r"clipjob.model imports \['clipjob.checkpoint'\]"):
        test_should_import_only_lower_layers("clipjob.model")
