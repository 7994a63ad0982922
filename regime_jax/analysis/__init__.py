"""Numbers from records: pure host-side analysis (numpy; no JAX, no matplotlib, no run/).

:mod:`~regime_jax.analysis.timescales` (decay times, lag ratios),
:mod:`~regime_jax.analysis.online` (the causal settle detector),
:mod:`~regime_jax.analysis.seeds` (statistics over seeds),
:mod:`~regime_jax.analysis.curves` (the lag ratio over each rule's parameter),
:mod:`~regime_jax.analysis.summary` (a run's and a sweep's summary),
:mod:`~regime_jax.analysis.decoupling` (freeze variants against full training),
:mod:`~regime_jax.analysis.lagmap` (the lag ratio one factor at a time),
:mod:`~regime_jax.analysis.layout` (where a sweep's runs live),
:mod:`~regime_jax.analysis.fmt` (numbers as the report writes them).
Submodules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "curves",
    "decoupling",
    "fmt",
    "lagmap",
    "layout",
    "online",
    "seeds",
    "summary",
    "timescales",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"regime_jax.analysis.{name}")
    raise AttributeError(f"module 'regime_jax.analysis' has no attribute {name!r}")
