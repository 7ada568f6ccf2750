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



# --------------------------------------------------------------------------- layers
def _layer(module: str) -> str:
    if module == "lightning_distill.cli":
        return "cli"
    return "lab" if module.startswith("lightning_distill.lab") else "core"


def test_the_core_never_imports_the_lab_or_the_cli():
    graph = _graph()
    assert any(_layer(m) == "lab" for m in graph) and any(_layer(m) == "core" for m in graph)
    wrong = {m: sorted(t for t in ts if _layer(t) != "core") for m, ts in graph.items() if _layer(m) == "core"}
    assert not {m: ts for m, ts in wrong.items() if ts}, "core modules importing the lab or the CLI"
    # nor does the lab start runs through the CLI: it calls the core's functions
    assert not [m for m, ts in graph.items() if _layer(m) == "lab" and "lightning_distill.cli" in ts]


def _private_uses(tree: ast.AST):
    """``from lightning_distill.<core> import _name`` and ``<core module alias>._name`` in one file."""
    core_aliases, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_distill"):
            for a in node.names:
                target = f"{node.module}.{a.name}"
                if a.name.startswith("_") and a.name != "__version__" and _layer(node.module) == "core":
                    found.append(target)
                if _layer(target) == "core" and (PACKAGE / Path(*target.split(".")[1:])).with_suffix(".py").exists():
                    core_aliases.add(a.asname or a.name)  # `from lightning_distill.bank import scan`
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in core_aliases
                and node.attr.startswith("_")):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_the_private_use_check_sees_both_forms():
    src = "from lightning_distill.slices import _x\nfrom lightning_distill.bank import scan\nscan._world()\n"
    assert _private_uses(ast.parse(src)) == ["lightning_distill.slices._x", "scan._world"]
    assert _private_uses(ast.parse("from lightning_distill.lab.stats import _y\n")) == []  # inside the lab


def test_the_lab_cli_scripts_and_notebooks_use_only_the_cores_public_names():
    import json

    files = [*(PACKAGE / "lab").glob("*.py"), PACKAGE / "cli.py", *(Path(REPO) / "experiments").rglob("*.py")]
    sources = {str(f): f.read_text() for f in files}
    for nb in (Path(REPO) / "notebooks").glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        sources[str(nb)] = "\n".join(line for c in code for line in c.splitlines() if not line.lstrip().startswith(("%", "!")))
    assert len(sources) > 12
    bad = {f: uses for f, src in sources.items() if (uses := _private_uses(ast.parse(src)))}
    assert not bad, f"private names of the core used outside it: {bad}"


# --------------------------------------------------------------------------- one place for each thing (issue 34)
def test_the_old_bank_modules_warn_and_hand_out_the_bank_packages_objects():
    import importlib
    import sys
    import warnings

    import pytest

    for old, new, names in (("lightning_distill.prototypes", "lightning_distill.bank", ["load_bank", "PrototypeBank", "final_bank"]),
                            ("lightning_distill.bank_build", "lightning_distill.bank.build", ["run_bank_build", "ClassMap"])):
        sys.modules.pop(old, None)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with pytest.warns(DeprecationWarning, match=f"{new}.*0.6.0"):
                mod = importlib.import_module(old)
        target = importlib.import_module(new)
        assert all(getattr(mod, n) is getattr(target, n) for n in names)
        sys.modules.pop(old, None)


def test_train_names_no_method_and_builds_nothing_itself():
    """A method's data and figures come through its hooks (methods.target_config, methods.method_figures)."""
    import re

    from lightning_distill.methods import METHODS

    src = (PACKAGE / "train.py").read_text()
    named = [m for m in METHODS if m != "prototype" and re.search(rf"\b{m}\b", src, re.IGNORECASE)]
    assert not named, f"train.py names the methods {named}"
    assert "cmedl" not in (PACKAGE / "data" / "build.py").read_text().lower()
    assert len(src.splitlines()) <= 350


# the core's own layers, bottom first (docs/architecture.md): a module imports its own layer and the ones below
CORE_LAYERS = [
    ("base", ["registry", "io", "devices", "fingerprint", "metrics", "visuals", "config", "config."]),
    ("data", ["data."]),
    ("networks and losses", ["networks", "checkpoints", "losses."]),
    ("bank", ["bank.format", "bank.controls", "bank.axial", "bank.accumulate", "bank.callback", "bank.scan"]),
    ("modules and methods", ["modules", "methods", "methods."]),
    ("commands", ["inference", "slices", "teacher_model", "teach", "bank.teacher", "bank.build", "callbacks", "loggers",
                  "resume", "results", "prototypes", "bank_build", "export", "convert"]),
    ("train", ["train"]),
]


def _core_layer(module: str):
    name = module[len("lightning_distill."):]
    return next((i for i, (_, names) in enumerate(CORE_LAYERS)
                 if any(name == n or (n.endswith(".") and name.startswith(n)) for n in names)), None)


def test_no_core_import_runs_up_the_layers():
    graph = {m: ts for m, ts in _graph().items() if _layer(m) == "core"}
    unplaced = sorted(m for m in graph if _core_layer(m) is None)
    assert not unplaced, f"core modules in no layer of CORE_LAYERS (place them): {unplaced}"
    up = [f"{m} ({CORE_LAYERS[_core_layer(m)][0]}) -> {t} ({CORE_LAYERS[_core_layer(t)][0]})"
          for m, ts in sorted(graph.items()) for t in sorted(ts) if _core_layer(t) > _core_layer(m)]
    assert not up, f"imports that run up the layers: {up}"


def test_the_layer_check_sees_an_upward_import():
    assert _core_layer("lightning_distill.data.build") < _core_layer("lightning_distill.methods.cmedl")
    assert _core_layer("lightning_distill.config") == 0 and _core_layer("lightning_distill.train") == len(CORE_LAYERS) - 1


def test_no_module_is_over_600_lines():
    long = {str(f.relative_to(PACKAGE)): n for f in PACKAGE.rglob("*.py") if (n := len(f.read_text().splitlines())) > 600}
    assert not long, f"split these modules (one concept a file): {long}"


REPO_WIDE_TESTS = {"test_layout", "test_offline", "test_notebooks"}  # checks of the repository, not of one module


def test_tests_are_laid_out_as_the_package():
    """A test file sits in tests/<subpackage>/ for a subpackage's module, or is tests/test_<module>.py for a
    top-level module (or one of the repository-wide checks), so a module's tests are found where it is."""
    tests = Path(REPO) / "tests"
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    top_modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    misplaced = []
    for f in sorted(tests.rglob("test_*.py")):
        rel = f.relative_to(tests)
        if len(rel.parts) == 1:
            if f.stem not in REPO_WIDE_TESTS and f.stem[len("test_"):] not in top_modules:
                misplaced.append(f"{rel} (no module lightning_distill/{f.stem[len('test_'):]}.py)")
        elif len(rel.parts) != 2 or rel.parts[0] not in subpackages:
            misplaced.append(f"{rel} (no subpackage lightning_distill/{rel.parts[0]}/)")
    assert not misplaced, f"tests outside the package's layout: {misplaced}"
