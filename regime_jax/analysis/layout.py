"""Where a sweep's runs live: the one spelling of ``<root>/<setting>/<optimizer>/seed_<k>/``.

:mod:`regime_jax.sweep` writes runs at :func:`path`, :func:`find_runs` finds them again (for
:mod:`regime_jax.analysis.summary` and :mod:`regime_jax.report`), :func:`name` is a run's name
in the sweep's ``summary.json``, its notes and its grid file ``GRID``.

>>> name("mlp_mnist1d", "sgd", 3)
'mlp_mnist1d/sgd/seed_3'
>>> parse(path("runs/reproduce", "mlp_mnist1d", "sgd", 3))
('mlp_mnist1d', 'sgd', 3)
"""

from __future__ import annotations

import os
from pathlib import Path

from regime_jax import records

__all__ = ["GRID", "PATTERN", "find_runs", "name", "parse", "path"]

GRID = "sweep.json"  # the resolved grid, written by regime_jax.sweep before the first run
PATTERN = "<setting>/<optimizer>/seed_<k>"  # how messages and docs spell the layout
_SEED = "seed_"


def name(setting: str, optimizer: str, seed: int) -> str:
    """A run's name within its sweep, ``"<setting>/<optimizer>/seed_<k>"``."""
    return f"{setting}/{optimizer}/{_SEED}{seed}"


def path(root: str | os.PathLike, setting: str, optimizer: str, seed: int) -> Path:
    """The directory of run ``(setting, optimizer, seed)`` of the sweep at ``root``."""
    return Path(root) / name(setting, optimizer, seed)


def parse(rundir: str | os.PathLike) -> tuple[str, str, int] | None:
    """``(setting, optimizer, seed)`` of a run directory laid out by :func:`path`, else None."""
    rundir = Path(rundir)
    if not rundir.name.startswith(_SEED) or not rundir.name.removeprefix(_SEED).isdigit():
        return None
    return rundir.parent.parent.name, rundir.parent.name, int(rundir.name[len(_SEED) :])


def find_runs(root: str | os.PathLike) -> list[tuple[str, str, int, Path]]:
    """``(setting, optimizer, seed, path)`` of every run under ``root`` (a directory at
    :func:`path` holding a ``config.json``), sorted."""
    out = []
    for cfg in Path(root).glob(f"*/*/{_SEED}*/{records.CONFIG}"):
        key = parse(cfg.parent)
        if key is not None:
            out.append((*key, cfg.parent))
    return sorted(out)
