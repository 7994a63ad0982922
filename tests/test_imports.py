"""The package's import graph: acyclic, training never reaches the report, summary draws nothing.

The graph is read from the source (AST), so an import inside a function counts as much as one
at the top of a module: a cycle hidden by a function-level import is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "regime_jax"
SRC = Path(__file__).resolve().parent.parent / PACKAGE


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(name: str) -> str:
    """``name`` if it is one of the package's modules, else the longest such prefix of it."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str) -> list[tuple[str, list[str]]]:
    """``(module imported from, [names])`` of every import statement, wherever it is: an
    ``import a.b`` is ``("a.b", [])``; relative imports are made absolute."""
    path = MODULES[module]
    package = module.split(".")[: None if path.name == "__init__.py" else -1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # one package up per dot after the first
                up = package[: len(package) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            out.append((base, [alias.name for alias in node.names]))
    return out


def _in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def import_graph() -> dict[str, set[str]]:
    """``{module: the package's modules it imports}``.

    ``import regime_jax.x`` and ``from regime_jax import x`` give ``regime_jax.x`` (a module or
    a subpackage); ``from regime_jax.x import y`` gives ``regime_jax.x.y`` where that is a
    module, else ``regime_jax.x``. The parent packages Python initializes on the way are not
    edges (every submodule would otherwise "import" the package that imports it).
    """
    graph = {}
    for module in MODULES:
        edges = set()
        for base, names in _imports(module):
            if not _in_package(base):
                continue
            if not names:
                edges.add(_resolve(base))
            for name in names:
                full = f"{base}.{name}"
                edges.add(full if full in MODULES else _resolve(base))
        graph[module] = edges - {module}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or transitively."""
    seen, stack = set(), [start]
    while stack:
        new = graph[stack.pop()] - seen
        seen |= new
        stack += new
    return seen


def _path(graph: dict[str, set[str]], start: str, goal: str) -> list[str]:
    """One import chain from ``start`` to ``goal`` (breadth first), [] if there is none."""
    parents, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for module in frontier:
            for dep in sorted(graph[module] - parents.keys()):
                parents[dep] = module
                nxt.append(dep)
        frontier = nxt
    if goal not in parents:
        return []
    chain = [goal]
    while parents[chain[-1]] is not None:
        chain.append(parents[chain[-1]])
    return chain[::-1]


def test_the_graph_is_read_from_function_level_imports_too():
    graph = import_graph()
    assert {
        "regime_jax.analysis.summary",
        "regime_jax.report.plots",
        "regime_jax.report",
    } <= graph.keys()
    assert "regime_jax.run.loop" in graph["regime_jax.main"]  # imported inside run()
    assert "regime_jax.configs.base" in graph["regime_jax.run.cli"]  # imported inside functions
    assert (
        "regime_jax.models.adapt" in graph["regime_jax.stability._radius"]
    )  # a subpackage's module
    assert "regime_jax.models" in graph["regime_jax.run.loop"]  # a subpackage itself


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """``"a -> b -> a"`` for every edge ``a -> b`` from which ``a`` can be reached again."""
    return [
        " -> ".join([module, *_path(graph, dep, module)])
        for module in sorted(graph)
        for dep in sorted(graph[module])
        if _path(graph, dep, module)
    ]


def test_find_cycles_finds_a_cycle_through_several_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == ["a -> b -> c -> a", "b -> c -> a -> b", "c -> a -> b -> c"]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_there_is_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_split_of_reporting():
    graph = import_graph()
    assert "regime_jax.analysis.summary" in graph["regime_jax.report.plots"]
    assert {"regime_jax.analysis.summary", "regime_jax.report.plots"} <= graph["regime_jax.report"]
    assert "regime_jax.report" not in _reachable(graph, "regime_jax.report.plots")
    reach = _reachable(graph, "regime_jax.analysis.summary")
    assert not reach & {"regime_jax.report.plots", "regime_jax.report", "regime_jax.run.loop"}


def test_summary_never_imports_matplotlib():
    imported = [base for base, _ in _imports("regime_jax.analysis.summary")]
    assert "numpy" in imported and not [n for n in imported if n.split(".")[0] == "matplotlib"]


TRAINING = ["regime_jax.run.step", "regime_jax.run.loop", "regime_jax.main"]


@pytest.mark.parametrize("module", TRAINING)
@pytest.mark.parametrize("forbidden", ["regime_jax.report", "regime_jax.report.plots"])
def test_training_never_imports_the_report_or_the_figures(module, forbidden):
    graph = import_graph()
    assert forbidden not in _reachable(graph, module), " -> ".join(_path(graph, module, forbidden))


def test_the_config_schema_imports_no_implementation():
    assert import_graph()["regime_jax.configs.base"] <= {"regime_jax.registry"}


# ------------------------------------------------------------------------ wings by layer

WINGS = ("run", "analysis", "report", "configs")
ENTRY_POINTS = {f"{PACKAGE}.main", f"{PACKAGE}.sweep"}


def wing(module: str) -> str:
    """``run``, ``analysis``, ``report`` or ``configs``; ``entry`` for main and sweep; ``facade``
    for the package's ``__init__`` (``rj.*`` names any layer); else ``library``."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in WINGS:
        return parts[1]
    if module in ENTRY_POINTS:
        return "entry"
    return "facade" if module == PACKAGE else "library"


# who may import whom (the entry points and the facade may import anything)
MAY_IMPORT = {
    "library": {"library"},
    "configs": {"library", "configs"},
    "analysis": {"library", "analysis", "configs"},
    "report": {"library", "analysis", "report", "configs"},
    "run": {"library", "analysis", "run", "configs", "facade"},  # facade: __version__
}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} ({wing(module)}) -> {dep} ({wing(dep)})"
        for module in sorted(graph)
        if wing(module) in MAY_IMPORT
        for dep in sorted(graph[module])
        if wing(dep) not in MAY_IMPORT[wing(module)]
    ]


def test_layer_violations_are_found():
    graph = {
        "regime_jax.records": {"regime_jax.run.loop"},
        "regime_jax.analysis.summary": {"regime_jax.report.plots", "regime_jax.records"},
        "regime_jax.report": {"regime_jax.analysis.summary"},
        "regime_jax.main": {"regime_jax.report"},
    }
    assert layer_violations(graph) == [
        "regime_jax.analysis.summary (analysis) -> regime_jax.report.plots (report)",
        "regime_jax.records (library) -> regime_jax.run.loop (run)",
    ]


def test_every_import_goes_down_the_layers():
    """The library reaches no wing; analysis and report never reach run/; analysis never
    reaches report; configs reach only the library."""
    violations = layer_violations(import_graph())
    assert not violations, "imports against the layers:\n" + "\n".join(violations)


@pytest.mark.parametrize("name", ["", *(f".{w}" for w in WINGS), ".stability"])
def test_every_wing_declares_its_public_names(name):
    tree = ast.parse(MODULES[PACKAGE + name].read_text())
    declared = [
        node
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(getattr(t, "id", "") == "__all__" for t in node.targets)
    ]
    assert declared, f"{PACKAGE}{name}/__init__.py declares no __all__"


def _fresh_python(code: str) -> str:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=SRC.parent
    ).stdout


def test_reading_a_run_needs_neither_jax_nor_flax(tmp_path):
    """A run's rows, config and summary read with numpy alone (a notebook on a laptop)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"num_steps": 2}')
    (run / "metrics.jsonl").write_text(
        '{"step": 0, "flip/all": 0.5}\n{"step": 1, "flip/all": 0.25}\n'
    )
    code = (
        "import sys; from regime_jax import records; "
        f"rows = records.read_rows({str(run)!r}); "
        "from regime_jax.analysis import timescales, seeds, curves; "
        "print(len(rows), sorted(m for m in ('jax', 'flax', 'optax', 'orbax') if m in sys.modules))"
    )
    assert _fresh_python(code).split() == ["2", "[]"]


OLD_PATHS = ["loop", "step", "summary", "timescales", "plots", "config", "overrides", "decouple"]


@pytest.mark.parametrize("old", OLD_PATHS)
def test_old_paths_warn_and_give_the_same_module(old):
    import importlib
    import sys

    from regime_jax import _deprecations

    new = _deprecations.MOVED[f"{PACKAGE}.{old}"]
    sys.modules.pop(f"{PACKAGE}.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"{PACKAGE}.{old} moved to {new}"):
        module = importlib.import_module(f"{PACKAGE}.{old}")
    assert module is importlib.import_module(new)
    assert module.__spec__.name == new  # the new module keeps its own identity


def test_old_names_through_the_package_warn():
    code = "import warnings; warnings.simplefilter('error'); from regime_jax import summary"
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=SRC.parent
    )
    assert (
        out.returncode == 1
        and "regime_jax.summary moved to regime_jax.analysis.summary" in out.stderr
    )
    import regime_jax as rj

    vars(rj).pop("decouple", None)  # set by an earlier import of the old module path
    with pytest.warns(DeprecationWarning, match="regime_jax.gating"):
        assert rj.decouple is rj.gating
