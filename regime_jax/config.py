"""The config schema shared by every experiment, and its validation.

An experiment module ``experiments/<name>.py`` defines ``get_config(arg=None)`` that starts
from :func:`base_config` and overrides fields. :func:`validate_config` runs before any data
is loaded or any array is computed; every error names the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from regime_jax import data, models, stability, timescales

OPTIMIZERS = ("adam", "sgd")
CUSTOM_MODEL = "custom"  # model.name of a run given a model object, not a registry name
SCHEDULES = ("constant", "cosine")


class ConfigError(ValueError):
    """A config field has a value regime_jax cannot run with."""


def base_config() -> ml_collections.ConfigDict:
    """Defaults for every field (an MLP on MNIST-1D with SGD + momentum)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = dict(name="mnist1d", num_samples=5000, seed=42, data_dir=None, download=True)
    c.probe = dict(size=512, seed=0)
    c.model = dict(name="mlp", hidden=(256, 256), activation="relu")
    c.optimizer = dict(
        name="sgd", learning_rate=0.05, momentum=0.9, schedule="constant", warmup_steps=0
    )
    c.batch_size = 128
    c.num_steps = 3000
    c.record = dict(every_steps=1, snapshot_every_steps=100)
    c.log_every_steps = 100
    c.eval_every_steps = 100
    c.eval_batch_size = 1000
    c.overwrite = False  # start afresh in a workdir that already holds a run
    # every_steps=0: save only at the end (and on Ctrl-C); keep: how many to keep.
    c.checkpoint = dict(every_steps=500, keep=3)
    # Finite-difference stability probe during training (regime_jax.stability): at step 0,
    # the last step and num_points log-spaced steps between; 0 disables it. The other fields
    # are stability.ProbeConfig's; probe_size <= probe.size takes the first examples of the
    # probe set (0: all of it).
    c.stability = dict(
        num_points=0, probe_size=0, seed=0, **dataclasses.asdict(stability.ProbeConfig())
    )
    # Decay-time analysis of the recorded series (fields of timescales.DecayConfig).
    c.timescales = dataclasses.asdict(timescales.DecayConfig())
    return c


def smoke(c: ml_collections.ConfigDict, num_steps: int, probe_size: int, batch_size=None) -> None:
    """Shrinks ``c`` in place to an experiment's ``:quick`` smoke run (a few seconds).

    Logs every 10 steps; evaluates and snapshots masks at the middle and the end.
    """
    c.num_steps, c.probe.size = num_steps, probe_size
    c.log_every_steps = 10
    c.eval_every_steps = c.record.snapshot_every_steps = num_steps // 2
    if batch_size is not None:
        c.batch_size = batch_size


def _get(c: ml_collections.ConfigDict, field: str) -> Any:
    for part in field.split("."):
        c = c[part]
    return c


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{field}={value!r} is unknown; allowed values: {sorted(allowed)}")


def _positive(field: str, value: Any, kind: type = int) -> None:
    if not isinstance(value, kind | int) or isinstance(value, bool) or not value > 0:
        raise ConfigError(f"{field}={value!r} must be a positive {kind.__name__}")


def _cadence(field: str, value: Any, num_steps: int) -> None:
    _positive(field, value)
    if value > num_steps:
        raise ConfigError(
            f"{field}={value} is larger than num_steps={num_steps}; allowed values: 1..{num_steps}"
        )


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` naming the first bad field (no data, no compute)."""
    _choice("dataset.name", c.dataset.name, data.DATASETS)
    if c.model.name != CUSTOM_MODEL:
        _choice("model.name", c.model.name, (*models.MODELS, CUSTOM_MODEL))
        try:
            models.create_model(c.model, num_classes=10)  # builds the module only; no arrays
        except ValueError as err:
            raise ConfigError(str(err)) from err
    _choice("optimizer.name", c.optimizer.name, OPTIMIZERS)
    _choice("optimizer.schedule", c.optimizer.schedule, SCHEDULES)
    _positive("optimizer.learning_rate", c.optimizer.learning_rate, float)
    if not 0 <= c.optimizer.get("momentum", 0.0) < 1:
        raise ConfigError(f"optimizer.momentum={c.optimizer.momentum!r} must be in [0, 1)")
    for field in ("batch_size", "num_steps", "probe.size", "eval_batch_size"):
        _positive(field, _get(c, field))
    if not 0 <= c.optimizer.get("warmup_steps", 0) < c.num_steps:
        raise ConfigError(
            f"optimizer.warmup_steps={c.optimizer.warmup_steps!r}; allowed values: "
            f"0..{c.num_steps - 1} (below num_steps)"
        )
    for field in (
        "record.every_steps",
        "record.snapshot_every_steps",
        "log_every_steps",
        "eval_every_steps",
    ):
        _cadence(field, _get(c, field), c.num_steps)
    ck = c.checkpoint
    if not isinstance(ck.every_steps, int) or ck.every_steps < 0:
        raise ConfigError(f"checkpoint.every_steps={ck.every_steps!r} must be an int >= 0")
    _positive("checkpoint.keep", ck.keep)
    st = c.stability
    if not isinstance(st.num_points, int) or st.num_points < 0:
        raise ConfigError(f"stability.num_points={st.num_points!r} must be an int >= 0")
    if not isinstance(st.probe_size, int) or not 0 <= st.probe_size <= c.probe.size:
        raise ConfigError(
            f"stability.probe_size={st.probe_size!r}; allowed values: 0..{c.probe.size} "
            f"(probe.size; 0 means the whole probe set)"
        )
    try:
        probe_config(c)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"stability: {err}") from err
    try:
        timescales.DecayConfig(**c.timescales)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"timescales: {err}") from err
    if c.record.snapshot_every_steps % c.record.every_steps:
        raise ConfigError(
            f"record.snapshot_every_steps={c.record.snapshot_every_steps} must be a multiple of "
            f"record.every_steps={c.record.every_steps} (snapshots are taken at record steps)"
        )


def probe_config(c: ml_collections.ConfigDict) -> stability.ProbeConfig:
    """The stability probe's static settings from ``config.stability``."""
    extra = ("num_points", "probe_size", "seed")
    return stability.ProbeConfig(**{k: v for k, v in c.stability.items() if k not in extra})
