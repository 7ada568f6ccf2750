"""The package's import graph has no cycle (issue 18).

Every import statement counts, at any depth of a file (an import inside a function still ties the
two modules together); imports of a package's ``__init__`` (re-exports) do not.
"""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = Path(REPO) / "lightning_distill"


def _modules():
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _graph():
    mods = _modules()
    packages = {m for m, f in mods.items() if f.name == "__init__.py"}
    graph = {}
    for name, f in mods.items():
        if name in packages:
            continue
        targets = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1
                    pkg = name.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
                targets |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in mods and t not in packages and t != name}
    return graph


def _reach(graph, start, back=False):
    """Modules reachable from ``start`` (``back``: the modules that reach ``start``)."""
    edges = graph if not back else {m: {s for s, ts in graph.items() if m in ts} for m in graph}
    seen, todo = set(), [start]
    while todo:
        for nxt in edges[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _cycles(graph):
    """Groups of modules that import each other, directly or through others (strongly connected, > 1)."""
    reachable = {m: _reach(graph, m) for m in graph}
    groups = []
    for m in sorted(graph):
        group = {m} | {o for o in reachable[m] if m in reachable[o]}
        if len(group) > 1 and group not in groups:
            groups.append(group)
    return groups


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(g) == [{"a", "b", "c"}]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    graph = _graph()
    assert len(graph) > 30 and "lightning_distill.train" in graph
    cycles = [sorted(c) for c in _cycles(graph)]
    assert not cycles, f"import cycles: {cycles}"
    # the three cycles broken in issue 18, named so that a regression says which
    assert "lightning_distill.modules" not in _reach(graph, "lightning_distill.methods.sikd", back=True)
    assert "lightning_distill.train" not in _reach(graph, "lightning_distill.inference")
    assert not {"lightning_distill.cli", "lightning_distill.lab.benchmark"} & _reach(graph, "lightning_distill.lab.bench_report")
    assert "lightning_distill.cli" not in _reach(graph, "lightning_distill.lab.benchmark")

