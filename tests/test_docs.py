"""The code in README.md and docs/**/*.md runs, or says why it does not.

Every fenced block declares what it is, by its info string:

* ``python``: executed by this test unless the line right before the fence is a marker.
  The blocks of one page run in order in one fresh interpreter (``JAX_PLATFORMS=cpu``) and
  share one namespace, so a page may build on its earlier blocks (stand-ins for a user's
  model and data first, then the code that uses them). The interpreter runs in a temporary
  directory, so a block that writes files leaves nothing in the clone, and imports regime_jax
  from its wheel installed in a folder of its own (``conftest.installed_site``), not from the
  clone: the examples work for a user who installed the package.
* ``bash``: commands to type at a shell; never executed here. A block needs no marker when it
  is obviously commands: every command in it (after ``VAR=value`` assignments, across
  ``\\`` continuations, ``&&`` and ``;``) is one of :data:`COMMANDS`, the programs of a clone
  and its virtual environment. Anything else (a loop, ``gcloud``, ``srun``) carries a marker
  saying why it is not run here.
* ``text``: output, trees and listings; not code, never executed.
* ``{directive}`` (MyST: ``{toctree}``, ``{eval-rst}``): markup, not code.

Any other info string, an empty one included, fails the test.

Markers are HTML comments, invisible on GitHub and in the built docs, on the line right
before the fence, each with a non-empty reason:

* ``<!-- not run: <reason> -->``: the block needs a run directory, a network, an
  accelerator, a long run or several processes; the reason says which (and, where there is
  one, which test covers it instead).
* ``<!-- heavy: <reason> -->``: the block runs, but slowly: only under ``pytest -m heavy``
  (the page's run then includes it, in order).

The default run (every page's unmarked ``python`` blocks) takes well under a minute on 2 CPU
cores.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import FROM_THE_INSTALL, installed_env

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PAGES = [p for p in PAGES if "_build" not in p.relative_to(ROOT).parts]

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>not run|heavy)\s*:(?P<reason>.*?)-->\s*$")
LOOSE_MARKER = re.compile(r"^\s*<!--\s*(not[ _-]?run|heavy)\b", re.IGNORECASE)
LANGUAGES = {"python", "bash", "text"}
COMMANDS = {"python", "python3", "pip", "bash", "tfds", "tensorboard"}
VENV = ".venv/bin/"
README_MAX_LINES = 200
PAGE_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # "not run" | "heavy" | None
    reason: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """Every fenced block of a Markdown page, dedented to its fence, with its marker."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        end = i + 1
        while end < len(lines) and not (
            lines[end].strip().startswith(fence)
            and set(lines[end].strip()) == {fence[0]}
            and len(lines[end].strip()) >= len(fence)
        ):
            end += 1
        body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[i + 1 : end]]
        marker = MARKER.match(lines[i - 1]) if i > 0 else None
        out.append(
            Block(
                page=page,
                line=i + 1,
                lang=info.split()[0] if info else "",
                code=textwrap.dedent("\n".join(body)) + "\n",
                marker=marker["kind"] if marker else None,
                reason=marker["reason"].strip() if marker else "",
            )
        )
        i = end + 1
    return out


BLOCKS = [b for page in PAGES for b in blocks_of(page)]


def _ids(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ----------------------------------------------------------------------------- the rules
def test_the_pages_are_found():
    assert ROOT / "README.md" in PAGES and len(PAGES) > 10
    assert any(b.lang == "python" and b.marker is None for b in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.where)
def test_every_block_declares_what_it_is(block):
    ok = block.lang in LANGUAGES or block.lang.startswith("{")
    assert ok, f"{block.where}: info string {block.lang!r}; use one of {sorted(LANGUAGES)}"


@pytest.mark.parametrize("page", PAGES, ids=_ids)
def test_every_marker_is_well_formed_and_has_a_reason(page):
    lines = page.read_text().splitlines()
    for n, line in enumerate(lines):
        if not LOOSE_MARKER.search(line):
            continue
        m = MARKER.match(line)
        where = f"{page.relative_to(ROOT)}:{n + 1}"
        assert m, f"{where}: write a marker as <!-- not run: reason --> or <!-- heavy: reason -->"
        assert m["reason"].strip(), f"{where}: a marker needs a reason"
        assert n + 1 < len(lines) and FENCE.match(lines[n + 1]), (
            f"{where}: a marker goes on the line right before a fence"
        )


def _commands(code: str) -> list[str]:
    """The program of each command in a shell block (comments and assignments skipped)."""
    text = re.sub(r"\\\n", " ", code)
    programs = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for command in re.split(r"&&|\|\||;|\|", line):
            words = shlex.split(command, posix=True) if command.strip() else []
            words = [w for w in words if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w)]
            if words:
                programs.append(words[0])
    return programs


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "bash"], ids=lambda b: b.where)
def test_a_shell_block_is_obviously_commands_or_says_why_not(block):
    if block.marker:
        return
    for program in _commands(block.code):
        ok = program in COMMANDS or program.startswith(VENV)
        assert ok, (
            f"{block.where}: {program!r} is not one of {sorted(COMMANDS)} or {VENV}*: "
            "mark the block <!-- not run: reason -->"
        )


def test_readme_is_a_front_page():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move the detail into docs/"


def test_ci_runs_exactly_the_readme_test_command():
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in ln]
    readme = [b.code.strip() for b in blocks_of(ROOT / "README.md") if "pytest" in b.code]
    assert len(ci) == 1 and ci[0].strip() in readme, (ci, readme)


LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


@pytest.mark.parametrize("page", [ROOT / "README.md"], ids=_ids)
def test_readme_links_point_at_files_of_the_clone(page):
    """The docs build checks docs/ links; README is not part of it, so this checks its own."""
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{page.name}: link to {target} (no such file)"


# ----------------------------------------------------------------------------- running them
RUNNER = r"""
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for where, code in blocks:
    print(f"--- {where}", flush=True)
    try:
        exec(compile(code, where, "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: the block at {where}", file=sys.stderr, flush=True)
        sys.exit(1)
"""


def _run_page(page: Path, tmp_path: Path, heavy: bool, site: Path) -> None:
    todo = [
        (b.where, b.code)
        for b in blocks_of(page)
        if b.lang == "python" and (b.marker is None or (heavy and b.marker == "heavy"))
    ]
    if not todo:
        pytest.skip("no runnable python block")
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps(todo))
    work = tmp_path / "cwd"
    work.mkdir()
    # regime_jax from its wheel, not the clone: the examples work for a user who pip-installed it
    todo.insert(0, ("the install", FROM_THE_INSTALL))
    spec.write_text(json.dumps(todo))
    env = installed_env(site, JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path), MPLBACKEND="Agg")
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(spec)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=PAGE_TIMEOUT_S,
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}"


RUNNABLE = sorted({b.page for b in BLOCKS if b.lang == "python" and b.marker is None})
HEAVY = sorted({b.page for b in BLOCKS if b.lang == "python" and b.marker == "heavy"})


@pytest.mark.parametrize("page", RUNNABLE, ids=_ids)
def test_the_python_blocks_of_a_page_run(page, tmp_path, installed_site):
    _run_page(page, tmp_path, heavy=False, site=installed_site)


@pytest.mark.heavy
@pytest.mark.parametrize("page", HEAVY, ids=_ids)
def test_the_python_blocks_of_a_page_run_with_the_heavy_ones(page, tmp_path, installed_site):
    _run_page(page, tmp_path, heavy=True, site=installed_site)
