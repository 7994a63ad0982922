"""Old import paths, kept for one release (optax's ``deprecations.py`` pattern).

Version 0.4 grouped the flat modules into wings (``run/``, ``analysis/``, ``report/``,
``configs/``). An import of an old path (``regime_jax.loop``, ``from regime_jax import
summary``) still works: it warns with a :class:`DeprecationWarning` naming the new path and
gives the very same module object, so state set through either name is shared.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

# old module -> new module (every path README or a notebook ever showed, and the rest of the
# modules that moved)
MOVED = {
    **{
        f"regime_jax.{m}": f"regime_jax.run.{m}"
        for m in (
            "step",
            "chunks",
            "fetch",
            "loop",
            "checkpoint",
            "rundir",
            "hosts",
            "signals",
            "live",
            "fingerprint",
            "cli",
        )
    },
    **{
        f"regime_jax.{m}": f"regime_jax.analysis.{m}"
        for m in (
            "timescales",
            "online",
            "seeds",
            "curves",
            "summary",
            "decoupling",
        )
    },
    "regime_jax.plots": "regime_jax.report.plots",
    "regime_jax.config": "regime_jax.configs.base",
    "regime_jax.overrides": "regime_jax.configs.overrides",
    "regime_jax.radius": "regime_jax.stability._radius",
    "regime_jax.decouple": "regime_jax.gating",
}
REMOVED_IN = "0.5"


def warn(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(
        f"{old} moved to {new}; the old path is removed in regime_jax {REMOVED_IN}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


class _Alias(importlib.abc.Loader):
    """Loads an old path as the new module itself (no copy)."""

    def __init__(self, new: str):
        self.new = new
        self._spec = None

    def create_module(self, spec) -> ModuleType:
        warn(spec.name, self.new, stacklevel=6)
        module = importlib.import_module(self.new)
        self._spec = module.__spec__  # importlib sets __spec__ to the alias's; put it back
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        return None if new is None else importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Puts the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
