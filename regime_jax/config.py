"""The config schema shared by every experiment, and its validation.

An experiment module ``experiments/<name>.py`` defines ``get_config(arg=None)`` that starts
from :func:`base_config` and overrides fields. :func:`validate_config` runs before any data
is loaded or any array is computed; every error names the field and the allowed values.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import config_dict

from regime_jax import registry, stability, timescales  # TODO(configs-pkg): literal defaults
from regime_jax.registry import CUSTOM

OPTIMIZERS = ("adam", "sgd")
CUSTOM_MODEL = CUSTOM  # model.name of a run given a model object, not a registry name
SCHEDULES = ("constant", "cosine")


class ConfigError(ValueError):
    """A config field has a value regime_jax cannot run with."""


def base_config() -> ml_collections.ConfigDict:
    """Defaults for every field (an MLP on MNIST-1D with SGD + momentum)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # data_dir is a typed placeholder: None by default, settable from the command line.
    c.dataset = dict(
        name="mnist1d",
        num_samples=5000,
        seed=42,
        data_dir=config_dict.placeholder(str),
        download=True,
    )
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
    # Data parallelism: the batch and the probe set are sharded over this many local devices
    # on a "data" mesh axis (parameters replicated); 0 = all local devices.
    c.parallel = dict(devices=0)
    # Training steps per host call: K steps run in one jitted lax.scan over K stacked batches;
    # a chunk ends early at eval, stability-probe and checkpoint steps (README "Scale").
    c.steps_per_call = 1
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
    ok = isinstance(value, kind | int) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not value > 0:
        finite = ", finite" if kind is float else ""
        raise ConfigError(f"{field}={value!r} must be a positive{finite} {kind.__name__}")


SEED_MAX = 2**32 - 1  # numpy's legacy seeding (mnist1d) takes 32-bit seeds


def _seed(field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= SEED_MAX:
        raise ConfigError(f"{field}={value!r} must be an int in 0..{SEED_MAX}")


def _bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} must be True or False")


def _cadence(field: str, value: Any, num_steps: int) -> None:
    _positive(field, value)
    if value > num_steps:
        raise ConfigError(
            f"{field}={value} is larger than num_steps={num_steps}; allowed values: 1..{num_steps}"
        )


def _dataset_fields(d: ml_collections.ConfigDict) -> None:
    _positive("dataset.num_samples", d.num_samples)
    if d.data_dir is not None and not (isinstance(d.data_dir, str) and d.data_dir):
        raise ConfigError(f"dataset.data_dir={d.data_dir!r} must be a path or None")
    _bool("dataset.download", d.download)


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` naming the first bad field (no data, no compute).

    The schema only: names are checked against :mod:`regime_jax.registry`; what only an
    implementation can check (a model's fields, the stability and timescales blocks) is
    :func:`regime_jax.loop.check_config`'s.
    """
    devices = c.parallel.devices
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 0:
        raise ConfigError(
            f"parallel.devices={devices!r}; allowed values: an int >= 0 (0: all local devices)"
        )
    k = c.steps_per_call
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"steps_per_call={k!r}; allowed values: an int >= 1 (1: a step per call)")
    for field in ("seed", "probe.seed", "stability.seed"):
        _seed(field, _get(c, field))
    if c.dataset.name != CUSTOM:  # a user's Dataset object has none of these fields
        _seed("dataset.seed", c.dataset.seed)
        _choice("dataset.name", c.dataset.name, registry.DATASETS.names())
        _dataset_fields(c.dataset)
    _bool("overwrite", c.overwrite)
    if c.model.name != CUSTOM:
        _choice("model.name", c.model.name, registry.MODELS.names())
    _choice("optimizer.name", c.optimizer.name, OPTIMIZERS)
    _choice("optimizer.schedule", c.optimizer.schedule, SCHEDULES)
    _positive("optimizer.learning_rate", c.optimizer.learning_rate, float)
    momentum = c.optimizer.get("momentum", 0.0)
    if isinstance(momentum, bool) or not isinstance(momentum, float | int) or not 0 <= momentum < 1:
        raise ConfigError(f"optimizer.momentum={momentum!r} must be a number in [0, 1)")
    for field in ("batch_size", "num_steps", "probe.size", "eval_batch_size"):
        _positive(field, _get(c, field))
    warmup = c.optimizer.get("warmup_steps", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < c.num_steps:
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
    if c.record.snapshot_every_steps % c.record.every_steps:
        raise ConfigError(
            f"record.snapshot_every_steps={c.record.snapshot_every_steps} must be a multiple of "
            f"record.every_steps={c.record.every_steps} (snapshots are taken at record steps)"
        )


# ----------------------------------------------------------------- config files and overrides

VARIANTS = ("quick",)


def variant(arg: str | None, allowed: tuple[str, ...] = VARIANTS) -> str | None:
    """An experiment's ``:arg``: None (the full run) or one of ``allowed``, else ConfigError."""
    if arg is None or arg in allowed:
        return arg
    names = ", ".join(f"':{a}'" for a in allowed)
    raise ConfigError(f"unknown config variant ':{arg}'; allowed: none (the full run), {names}")


def _where(path: Path, err: BaseException) -> str:
    """`` (file:line)`` of the innermost frame of ``err`` inside ``path``, if any."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename) == path]
    return f" ({path}:{frames[-1].lineno})" if frames else ""


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the experiment file in ``spec`` (``path[:arg]``).

    Every failure is a one-line :class:`ConfigError`: a missing file, a file that does not
    import, no ``get_config``, an unknown ``:arg``.
    """
    path_text, sep, arg = spec.partition(":")
    path = Path(path_text).absolute()
    if not path_text or not path.is_file():
        raise ConfigError(f"config file {path_text!r} does not exist (expected a .py file)")
    module_spec = importlib.util.spec_from_file_location(f"_regime_config_{path.stem}", path)
    if module_spec is None:
        raise ConfigError(f"config file {path_text!r} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise ConfigError(f"config file {path_text!r} defines no get_config(arg=None)")
        config = module.get_config(arg if sep else None)
    except ConfigError as err:
        raise ConfigError(f"{path_text}: {err}") from None
    except Exception as err:  # a user's file: say where, in one line
        first = (str(err).splitlines() or [""])[0]
        raise ConfigError(
            f"config file {path_text!r} failed: {type(err).__name__}: {first}{_where(path, err)}"
        ) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"config file {path_text!r}: get_config returned {type(config).__name__}, "
            f"not an ml_collections.ConfigDict"
        )
    return config


def fields(c: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted name, value)`` of every leaf field, in definition order."""
    for key, value in c.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def field_type(c: ml_collections.ConfigDict, key: str) -> type:
    """The type a field accepts (a placeholder's declared type when its value is None)."""
    value = c[key]
    if value is None:
        try:
            return c.get_ref(key).get_type()  # placeholders are references already
        except Exception:  # a plain None field: no declared type
            return type(None)
    return type(value)


_SCALARS = (bool, int, float, str)
_TRUE, _FALSE = ("true", "t", "yes", "y", "1", "on"), ("false", "f", "no", "n", "0", "off")


def _parse_scalar(text: str, kind: type) -> Any:
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError("expected true or false")
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    if kind is str:
        return text
    raise ValueError(f"fields of type {kind.__name__} cannot be set from the command line")


def _parse_tuple(text: str, default: tuple) -> tuple:
    """``(8, 8)``, ``[8, 8]``, ``8,8`` or ``8``; elements typed like the default's."""
    kind = type(default[0]) if default else None
    stripped = text.strip()
    if stripped[:1] in "([":
        value = ast.literal_eval(stripped)
        items = list(value) if isinstance(value, list | tuple) else [value]
    else:
        items = [_parse_scalar(t.strip(), kind or str) for t in stripped.split(",") if t.strip()]
    if kind is float:
        items = [float(i) if type(i) is int else i for i in items]
    if kind is not None and not all(type(i) is kind for i in items):
        raise ValueError(f"expected a tuple of {kind.__name__}")
    return tuple(items)


def _example(kind: type, default: Any) -> str:
    if kind is list:
        return ",".join(map(str, default or (0, 1)))
    if kind is tuple:
        return "'(" + ", ".join(map(str, default or (8, 8))) + ")'"
    if kind is bool:
        return str(default).lower() if isinstance(default, bool) else "true"
    if isinstance(default, kind):
        return str(default)
    return {int: "1", float: "0.1", str: "text"}.get(kind, "?")


def _resolve(c: ml_collections.ConfigDict, field: str) -> tuple[ml_collections.ConfigDict, str]:
    """The ConfigDict holding ``field`` and its last key; a did-you-mean ConfigError if absent."""
    parts, node = field.split("."), c
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            prefix = ".".join(parts[:i])
            if not isinstance(node, ml_collections.ConfigDict):
                raise ConfigError(f"--config.{field}: {prefix!r} is a value, not a group of fields")
            keys = sorted(node.keys())
            close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
            hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            where = f"config.{prefix}" if prefix else "the config"
            raise ConfigError(
                f"--config.{field}: {where} has no field {part!r}; "
                + (hint or f"its fields: {', '.join(keys)}")
            )
        if i < len(parts) - 1:
            node = node[part]
    if isinstance(node[parts[-1]], ml_collections.ConfigDict):
        sub = ", ".join(sorted(node[parts[-1]].keys()))
        raise ConfigError(f"--config.{field} is a group of fields; set one of them: {sub}")
    return node, parts[-1]


def override(c: ml_collections.ConfigDict, field: str, text: str | None) -> None:
    """Sets ``field`` (dotted) from its command-line text, parsed by the field's type.

    ``text=None`` means a bare ``--config.<field>`` (true for a bool field). Raises a one-line
    :class:`ConfigError`: an unknown field (with a did-you-mean), a value of the wrong type.
    """
    node, key = _resolve(c, field)
    kind, default = field_type(node, key), node[key]
    if text is None:
        if kind is not bool:
            raise ConfigError(f"--config.{field} needs a value, e.g. --config.{field}=...")
        text = "true"
    # ConfigDict has no public "is this a placeholder" query; _fields holds the reference.
    nullable = isinstance(node._fields.get(key), config_dict.FieldReference)
    if (default is None or nullable) and text.lower() in ("none", "null"):
        node[key] = None  # a placeholder (e.g. dataset.data_dir) back to its default
        return
    if kind is list and not all(isinstance(v, _SCALARS) for v in default):
        raise ConfigError(
            f"--config.{field} is a list of {type(default[0]).__name__}s: it cannot be set "
            f"from the command line; edit the config file"
        )
    try:
        if kind is list:  # e.g. a sweep's seeds: like a tuple, items typed like the default's
            value = list(_parse_tuple(text, tuple(default)))
        elif kind is tuple:
            value = _parse_tuple(text, default)
        else:
            value = _parse_scalar(text, kind)
    except (ValueError, SyntaxError, TypeError) as err:
        reason = str(err).splitlines()[0] if str(err) else "malformed"
        if kind in (int, float, bool):
            reason = f"expected {'an' if kind is int else 'a'} {kind.__name__}"
        elif kind in (tuple, list):
            elem = type(default[0]).__name__ if default else "value"
            reason = f"expected a {kind.__name__} of {elem}"
        raise ConfigError(
            f"--config.{field}={text}: {reason}, e.g. --config.{field}={_example(kind, default)}"
        ) from None
    try:
        node[key] = value
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--config.{field}={text}: {str(err).splitlines()[0]}") from None


def describe(c: ml_collections.ConfigDict) -> str:
    """Every field as ``--config.<name>=<default>``, one per line (for ``--help``)."""
    lines = []
    for name, value in fields(c):
        if value is None:
            parent, _, key = name.rpartition(".")
            kind = field_type(_get(c, parent) if parent else c, key).__name__
            shown = f"None   ({kind} or None)"
        elif isinstance(value, list) and not all(isinstance(v, _SCALARS) for v in value):
            maps = (Mapping, ml_collections.ConfigDict)
            names = [str(v.get("name", "?")) if isinstance(v, maps) else "?" for v in value]
            kinds = type(value[0]).__name__
            shown = f"[{', '.join(names)}]   (a list of {kinds}s: edit the config file)"
        elif isinstance(value, tuple | list | str):
            shown = f"'{value}'" if isinstance(value, str) else f"'{value}'".replace(",)", ")")
        else:
            shown = value
        lines.append(f"  --config.{name}={shown}")
    return "\n".join(lines)
