"""Where the notebooks install from and open in Colab: one value, ``REPO`` (and ``BRANCH``).

Each notebook's install cell (its second cell) sets ``REPO = "<owner>/<name>"`` and
``BRANCH = "<branch>"``, and its first cell's Colab badge opens
``colab.research.google.com/github/<REPO>/blob/<BRANCH>/colab/<notebook>``. The two must agree,
in every notebook (``tests/test_notebooks.py`` checks it). To point them all somewhere else::

    python colab/set_repo.py <owner>/<name> [<branch>]

which rewrites the install cells and the badges of every ``colab/*.ipynb`` in place (outputs
stay empty), and prints the value they held before.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
COLAB = "https://colab.research.google.com/github/{repo}/blob/{branch}/colab/{name}"
_REPO = re.compile(r'^REPO = "([^"]*)"', re.MULTILINE)
_BRANCH = re.compile(r'^BRANCH = "([^"]*)"', re.MULTILINE)
_BADGE = re.compile(
    re.escape(f"[![Open In Colab]({BADGE_IMAGE})](")
    + r"https://colab\.research\.google\.com/github/[^)]*\)"
)


def notebooks() -> list[Path]:
    return sorted(HERE.glob("*.ipynb"))


def badge(repo: str, branch: str, name: str) -> str:
    """The markdown of the Colab badge of notebook ``name``."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({COLAB.format(repo=repo, branch=branch, name=name)})"


def _source(cell: dict) -> str:
    source = cell["source"]
    return "".join(source) if isinstance(source, list) else source


def read(path: Path) -> tuple[str, str]:
    """``(REPO, BRANCH)`` of a notebook's install cell (ValueError if it sets none)."""
    cells = json.loads(path.read_text())["cells"]
    install = _source(cells[1])
    repo, branch = _REPO.search(install), _BRANCH.search(install)
    if not repo or not branch:
        raise ValueError(f"{path.name}: its install cell sets no REPO / BRANCH")
    return repo.group(1), branch.group(1)


def write(path: Path, repo: str, branch: str) -> None:
    """Sets REPO and BRANCH in the install cell and the badge of the first cell."""
    nb = json.loads(path.read_text())
    title, install = nb["cells"][0], nb["cells"][1]
    text = _REPO.sub(lambda _: f'REPO = "{repo}"', _source(install))
    install["source"] = _BRANCH.sub(lambda _: f'BRANCH = "{branch}"', text).splitlines(True)
    title["source"] = _BADGE.sub(
        lambda _: badge(repo, branch, path.name), _source(title)
    ).splitlines(True)
    path.write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[1].count("/") != 1:
        print(__doc__, file=sys.stderr)
        return 2
    repo, branch = argv[1], argv[2] if len(argv) == 3 else "main"
    for path in notebooks():
        old_repo, old_branch = read(path)
        print(f"{path.name}: {old_repo}@{old_branch} -> {repo}@{branch}")
        write(path, repo, branch)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
