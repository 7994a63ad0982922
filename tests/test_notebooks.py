"""The Colab notebooks: committed without outputs, opened the same way, and run top to bottom.

The execution test runs each notebook with its ``QUICK = True`` defaults in a fresh ``python3``
kernel (this interpreter's ipykernel), in a temporary directory outside the repository (as on
Colab: configs come with the package, by name), with ``TMPDIR`` pointing there too so the
notebooks' ``tempfile.mkdtemp()`` workdirs are cleaned up; regime_jax comes from its wheel,
installed in a folder of its own (``conftest.installed_site``), not from the clone.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import FROM_THE_INSTALL, installed_env
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
EXPECTED = {"00_quickstart", "01_stability_test", "02_reproduce", "03_your_model"}
CELL_TIMEOUT_S = 300


def _load_set_repo():
    spec = importlib.util.spec_from_file_location("set_repo", ROOT / "colab" / "set_repo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


set_repo = _load_set_repo()


def _ids(path: Path) -> str:
    return path.stem


def test_every_notebook_is_present():
    assert EXPECTED <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs"
            assert cell.execution_count is None, f"cell {i} has an execution_count"
        assert "execution" not in cell.metadata, f"cell {i} keeps execution timings"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_opens_with_title_badge_install_and_parameters(path):
    title, install, params = nbformat.read(path, as_version=4).cells[:3]
    assert title.cell_type == "markdown" and title.source.startswith("# ")
    repo, branch = set_repo.read(path)
    assert set_repo.badge(repo, branch, path.name) in title.source  # the install cell's REPO
    assert install.cell_type == "code"
    for text in (
        f'REPO = "{repo}"',
        f'BRANCH = "{branch}"',
        "try:\n    import regime_jax\nexcept ImportError:",  # skipped where importable
        'get_ipython().run_line_magic("pip", ',
        'url = f"git+https://github.com/{REPO}@{BRANCH}"',
        'os.environ["GIT_TERMINAL_PROMPT"] = "0"',
    ):
        assert text in install.source
    assert "github.com/" not in title.source.replace(set_repo.badge(repo, branch, path.name), "")
    assert params.cell_type == "code" and "parameters" in params.metadata.get("tags", [])
    assert "QUICK = True" in params.source and "tempfile" in params.source


def test_every_notebook_installs_from_and_opens_the_same_place():
    """One REPO and BRANCH for all: the install cells and the badges agree (set_repo.py)."""
    places = {path.name: set_repo.read(path) for path in NOTEBOOKS}
    assert len(set(places.values())) == 1, places


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_says_plainly_that_the_repository_is_not_public_and_what_works(path):
    title = nbformat.read(path, as_version=4).cells[0].source
    assert "The repository is not public yet." in title
    assert "`pip install -e .`" in title and f"jupyter notebook colab/{path.name}" in title


def test_set_repo_moves_every_install_cell_and_badge_at_once(tmp_path):
    copies = []
    for path in NOTEBOOKS:
        shutil.copy(path, tmp_path / path.name)
        copies.append(tmp_path / path.name)
    for path in copies:
        set_repo.write(path, "someone/elsewhere", "dev")
    for path, original in zip(copies, NOTEBOOKS, strict=True):
        assert set_repo.read(path) == ("someone/elsewhere", "dev")
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert set_repo.badge("someone/elsewhere", "dev", path.name) in nb.cells[0].source
        before = nbformat.read(original, as_version=4)
        assert len(nb.cells) == len(before.cells)
        assert [c.source for c in nb.cells[2:]] == [c.source for c in before.cells[2:]]
        set_repo.write(path, *set_repo.read(original))
        assert path.read_text() == original.read_text()  # the committed files' exact bytes


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_needs_no_clone(path):
    """Nothing read from the repository: configs by name, never a path into a checkout."""
    code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)
    for text in ("experiments/", "regime_jax.__file__", "repo_root"):
        assert text not in code, f"{path.name} depends on a clone: {text!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_runs_top_to_bottom(path, tmp_path, installed_site):
    nb = nbformat.read(path, as_version=4)
    # regime_jax from its wheel, not the clone (the install cell then installs nothing)
    nb.cells.insert(0, nbformat.v4.new_code_cell(FROM_THE_INSTALL))
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # not the clone
    )
    env = installed_env(installed_site, TMPDIR=str(tmp_path))  # JAX_PLATFORMS=cpu: conftest
    client.execute(env=env)  # raises CellExecutionError (with the traceback) on any error
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    ]
    assert not errors
    if path.stem == "02_reproduce":
        _quick_sweep_has_numbers(nb, tmp_path)


def _text(cell) -> str:
    """What a cell showed, as text (stdout, and displayed values as plain text or markdown)."""
    parts = []
    for out in cell.outputs:
        parts.append(out.get("text", ""))
        parts += [out.get("data", {}).get(kind, "") for kind in ("text/plain", "text/markdown")]
    return "\n".join(parts)


def _quick_sweep_has_numbers(nb, tmp_path):
    """02_reproduce's quick mode gives every run its decay times and a lag ratio (no table of
    dashes): in the sweep's summary.json, and in what the notebook shows."""
    (summary_path,) = tmp_path.glob("regime_jax_sweep_*/summary.json")
    sweep = json.loads(summary_path.read_text())
    assert sweep["runs"] and sweep["groups"]
    for name, run in sweep["runs"].items():
        lag = run["lag"]["abs"][run["main_rule"]]
        assert lag["status"] == "ok" and lag["ratio"] is not None, (name, lag["status"])
    for name, group in sweep["groups"].items():
        stats = group["lag"]["abs"][group["main_rule"]]
        assert stats["mean"] is not None and stats["n"] == len(group["seeds"]), name
    (per_run,) = [c for c in nb.cells if "run_row(" in c.source and c.cell_type == "code"]
    shown = _text(per_run)
    for name in sweep["runs"]:
        assert name in shown
    assert "never_settles" not in shown
    report = "\n".join(
        _text(c) for c in nb.cells if c.cell_type == "code" and "report.md" in c.source
    )
    row = next(line for line in report.splitlines() if line.startswith("| mlp_mnist1d |"))
    assert any(ch.isdigit() for ch in row.split("|")[4]), row  # the lag ratio's mean [CI]


def test_reproduce_tables_print_readably_without_pandas(monkeypatch, capsys):
    """No cell shows a raw list where pandas is missing: show_table prints the rows."""
    nb = nbformat.read(ROOT / "colab" / "02_reproduce.ipynb", as_version=4)
    (cell,) = [c for c in nb.cells if "def show_table" in c.source]
    defs = [n for n in ast.parse(cell.source).body if isinstance(n, ast.FunctionDef)]
    namespace = {"display": lambda value: pytest.fail(f"displayed {type(value)}")}
    exec(compile(ast.Module(defs, type_ignores=[]), "02_reproduce", "exec"), namespace)
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas: ImportError
    rows = [
        {"run": "mlp/sgd/seed_0", "T(flip)": 120.0, "lag ratio": 1.0234, "why none": ""},
        {"run": "mlp/sgd/seed_1", "T(flip)": None, "lag ratio": None, "why none": "x: flat"},
    ]
    namespace["show_table"](rows)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "T(flip)", "lag", "ratio", "why", "none"]
    assert lines[1].split() == ["mlp/sgd/seed_0", "120", "1.02"]
    assert lines[2].split() == ["mlp/sgd/seed_1", "–", "–", "x:", "flat"]
