"""Sphinx configuration: Sphinx + sphinx-book-theme + myst-nb, as jax, flax and optax use.

Build (zero warnings, no network): ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the package of this checkout, not another installed copy
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # autodoc imports modules that import JAX

import regime_jax  # noqa: E402

project = "regime_jax"
author = "the regime_jax authors"
copyright = "the regime_jax authors"
release = version = regime_jax.__version__

extensions = [
    "myst_nb",  # Markdown pages (MyST) and the notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style docstrings
    "sphinx.ext.viewcode",
]

# Pages: docs/**/*.md and the notebooks, which live in colab/ and are linked into
# docs/notebooks/ (symlinks). README.md is the repository's front page and not part of the build.
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
root_doc = "index"

# MyST: heading anchors so that `page.md#a-heading` links work here as on GitHub.
myst_heading_anchors = 3

# Notebooks are committed without outputs and rendered as they are (design/development.md says
# why: tests/test_notebooks.py already executes every one in quick mode).
nb_execution_mode = "off"

# autodoc: signatures as written, members in source order, type hints in the description.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # a NamedTuple's Attributes: section, not a second attribute entry

# No intersphinx (the extension is not loaded, the mapping is empty): the build makes no network
# request. Remote images (the notebooks' Colab badge) are linked, never downloaded.
intersphinx_mapping: dict = {}

html_theme = "sphinx_book_theme"
html_title = f"regime_jax {version}"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "use_repository_button": False,  # not public yet (README, "Status")
}
html_static_path: list[str] = []


# --------------------------------------------------------------------------- docstring fix-up
def _nested_returns_as_list(app, what, name, obj, options, lines):
    """A Google ``Returns:`` body written as hanging-indent items becomes an RST bullet list.

    ``stability.perturb`` documents each returned key as an item whose continuation lines are
    indented deeper than the item; RST reads that as stray block quotes. Lines at the items'
    level get a ``* `` so that the continuation lines (2 deeper) fall inside the bullet. Only a
    body with three indent levels (intro, items, continuations) is touched.
    """
    for start, line in enumerate(lines):
        if line.strip() not in ("Returns:", "Yields:"):
            continue
        base = len(line) - len(line.lstrip())
        end = start + 1
        while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > base):
            end += 1
        body = [i for i in range(start + 1, end) if lines[i].strip()]
        levels = sorted({_indent(lines[i]) for i in body})
        if len(levels) == 3 and levels[2] - levels[1] == 2:
            for i in body:
                if _indent(lines[i]) == levels[1]:
                    lines[i] = " " * levels[1] + "* " + lines[i].lstrip()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def setup(app):
    app.connect("autodoc-process-docstring", _nested_returns_as_list, priority=400)
