"""The experiment configs shipped with regime_jax, and the one loader of every config.

Each module here is a runnable spec (big_vision style): ``get_config(arg=None)`` returns an
``ml_collections.ConfigDict``, ``arg="quick"`` selects a smoke variant of a few seconds, and
the docstring holds the exact COMMAND and the EXPECTED result. ``--config mlp_mnist1d:quick``
names one; ``--config path/to/file.py[:arg]`` loads a file of your own written the same way.

Variants inherit, as in the Flax examples: a config starts from its parent's full config
(``cnn_digits.get_config()``), sets what differs and defines its own ``:quick``; one that only
adds fields its parent's ``:quick`` leaves alone passes ``arg`` through
(``stability_mlp_mnist1d`` is ``mlp_mnist1d.get_config(arg)`` plus the stability test). The
root is :func:`regime_jax.configs.base.base_config`, where every field is documented::

  base_config                     regime_jax/configs/base.py
  └─ mlp_mnist1d                  the main job
     ├─ stability_mlp_mnist1d     + the stability test (with_probe)
     ├─ mlp_mnist
     ├─ transformer_mnist1d
     │  ├─ vit_cifar10
     │  │  └─ vit_s16_cifar10     ViT-S/16-style
     │  └─ gpt_shakespeare        causal decoder, ReLU FFN
     └─ mlp_digits
        └─ cnn_digits             the CNN block every CNN config derives
           ├─ stability_cnn_digits + stability_mlp_mnist1d's probe
           ├─ cnn_mnist1d
           └─ cnn_mnist
              └─ cnn_cifar10
                 └─ resnet18_cifar10  BatchNorm, skip connections

``reproduce``, ``decoupled`` and ``lag_map`` are sweep configs (``python -m regime_jax.sweep``,
listed in :data:`SWEEPS`): their settings name configs.

>>> "mlp_mnist1d" in names()
True
>>> load("mlp_mnist1d:quick").num_steps
40
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import pkgutil
import traceback
from pathlib import Path
from types import ModuleType

import ml_collections

from regime_jax.configs.base import ConfigError

__all__ = ["NOT_CONFIGS", "SWEEPS", "is_path", "load", "names"]

SWEEPS = ("decoupled", "lag_map", "reproduce")  # the packaged sweep configs
NOT_CONFIGS = ("base", "overrides")  # the schema and the override parser, beside the configs


def names() -> list[str]:
    """The packaged configs' names, sorted (:data:`SWEEPS` are sweep configs)."""
    mods = pkgutil.iter_modules(__path__)
    return sorted(m.name for m in mods if not m.name.startswith("_") and m.name not in NOT_CONFIGS)


def is_path(text: str) -> bool:
    """Whether ``--config``'s value (before ``:arg``) is a file rather than a packaged name."""
    return text.endswith(".py") or "/" in text


def load(spec: str) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the config in ``spec``: ``NAME[:arg]`` or ``path/to/file.py[:arg]``.

    ``NAME`` is a module of this package (:func:`names`); a value ending in ``.py`` or holding a
    ``/`` is a file. Every failure is a one-line :class:`~regime_jax.configs.base.ConfigError`: an
    unknown name (listing the available ones), a missing file, a module that does not import,
    no ``get_config``, an unknown ``:arg``, a result that is not a ConfigDict.
    """
    text, sep, arg = spec.partition(":")
    what = f"config file {text!r}" if is_path(text) else f"config {text!r}"
    module = _file_module(text, what) if is_path(text) else _packaged_module(text, what)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"{what} defines no get_config(arg=None)")
    try:
        config = module.get_config(arg if sep else None)
    except ConfigError as err:  # e.g. an unknown :arg
        raise ConfigError(f"{text}: {err}") from None
    except Exception as err:
        raise _failed(what, module, err) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"{what}: get_config returned {type(config).__name__}, not an ml_collections.ConfigDict"
        )
    return config


def _packaged_module(name: str, what: str) -> ModuleType:
    available = names()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(
            f"unknown config {name!r}: {hint}available: {', '.join(available)} "
            f"(or a path to a .py file)"
        )
    module_name = f"{__name__}.{name}"
    try:
        return importlib.import_module(module_name)
    except Exception as err:
        raise _failed(what, importlib.util.find_spec(module_name), err) from None


def _file_module(text: str, what: str) -> ModuleType:
    path = Path(text).absolute()
    if not path.is_file():
        packaged = Path(text).stem
        hint = f"; the packaged config is --config {packaged}" if packaged in names() else ""
        raise ConfigError(f"{what} does not exist (expected a .py file){hint}")
    module_spec = importlib.util.spec_from_file_location(f"_regime_config_{path.stem}", path)
    if module_spec is None:
        raise ConfigError(f"{what} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # a user's file: say where, in one line
        raise _failed(what, module, err) from None
    return module


def _failed(what: str, module, err: BaseException) -> ConfigError:
    """A one-line error: the exception's first line and the innermost line of ``module``."""
    first = (str(err).splitlines() or [""])[0]
    origin = getattr(module, "__file__", None) or getattr(module, "origin", None)
    frames = [
        f
        for f in traceback.extract_tb(err.__traceback__)
        if origin and Path(f.filename) == Path(origin)
    ]
    where = f" ({origin}:{frames[-1].lineno})" if frames else ""
    return ConfigError(f"{what} failed: {type(err).__name__}: {first}{where}")
