"""The Colab notebooks: committed without outputs, opened the same way, and run top to bottom.

The execution test runs each notebook with its ``QUICK = True`` defaults in a fresh ``python3``
kernel (this interpreter's ipykernel), in a temporary directory outside the repository (as on
Colab: configs come with the package, by name), with ``TMPDIR`` pointing there too so the
notebooks' ``tempfile.mkdtemp()`` workdirs are cleaned up.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
EXPECTED = {"00_quickstart", "01_stability_test", "02_reproduce", "03_your_model"}
BADGE = (
    "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
    "(https://colab.research.google.com/github/regime-jax/regime_jax/blob/main/colab/{name})"
)
CELL_TIMEOUT_S = 300


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
    assert BADGE.format(name=path.name) in title.source
    assert install.cell_type == "code"
    for text in (
        "REPO_URL = ",
        "try:\n    import regime_jax\nexcept ImportError:",
        'get_ipython().run_line_magic("pip", ',
    ):
        assert text in install.source
    assert params.cell_type == "code" and "parameters" in params.metadata.get("tags", [])
    assert "QUICK = True" in params.source and "tempfile" in params.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_needs_no_clone(path):
    """Nothing read from the repository: configs by name, never a path into a checkout."""
    code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)
    for text in ("experiments/", "regime_jax.__file__", "repo_root"):
        assert text not in code, f"{path.name} depends on a clone: {text!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_runs_top_to_bottom(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # not the clone
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # JAX_PLATFORMS=cpu from conftest
    client.execute(env=env)  # raises CellExecutionError (with the traceback) on any error
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    ]
    assert not errors
