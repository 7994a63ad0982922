"""The application: the built-in training run that writes a run directory.

``train_and_evaluate(config, workdir)`` (:mod:`regime_jax.run.loop`) is the entry; under it
:mod:`~regime_jax.run.step` (the pure jitted pieces a user's own loop may import alone),
:mod:`~regime_jax.run.engine` (the state and everything that computes on it, one
``advance(chunk)`` per chunk of the run's :class:`~regime_jax.schedule.Schedule`),
:mod:`~regime_jax.run.chunks` (K steps per call), :mod:`~regime_jax.run.fetch` (device
metrics to rows on a cadence), :mod:`~regime_jax.run.checkpoint`, :mod:`~regime_jax.run.rundir`
(lock, fresh start vs resume), :mod:`~regime_jax.run.fingerprint` (what a run is),
:mod:`~regime_jax.run.hosts`, :mod:`~regime_jax.run.signals`, :mod:`~regime_jax.run.live`
(TensorBoard, progress, phase clock), :mod:`~regime_jax.run.freeze` (when gates freeze) and
:mod:`~regime_jax.run.cli` (the command lines' shared parts). Submodules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "checkpoint",
    "chunks",
    "cli",
    "engine",
    "fetch",
    "fingerprint",
    "freeze",
    "hosts",
    "live",
    "loop",
    "rundir",
    "signals",
    "step",
    "train_and_evaluate",
]


def __getattr__(name: str) -> Any:
    if name == "train_and_evaluate":
        return importlib.import_module("regime_jax.run.loop").train_and_evaluate
    if name in __all__:
        return importlib.import_module(f"regime_jax.run.{name}")
    raise AttributeError(f"module 'regime_jax.run' has no attribute {name!r}")
