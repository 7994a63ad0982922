"""Name registries for models and datasets, readable without importing either.

The config schema (:mod:`regime_jax.configs.base`) checks ``model.name`` and ``dataset.name``
against
these registries and imports nothing else: a built-in entry is an import path resolved on first
use, and a user's entry is added with :meth:`Registry.register` (``models.register_model``,
``data.register_dataset``).

>>> reg = Registry("toy.name", {"sq": "math:sqrt"})
>>> reg.get("sq")(9.0)
3.0
>>> _ = reg.register("double", lambda x: 2 * x)
>>> reg.names()
('double', 'sq')
>>> reg.get("triple")
Traceback (most recent call last):
...
ValueError: toy.name='triple' is unknown; allowed values: ['double', 'sq']
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

CUSTOM = "custom"  # the name a config records for a user's object passed to train_and_evaluate


class Registry:
    """``name -> factory`` for one config field (e.g. ``model.name``)."""

    def __init__(self, field: str, builtins: Mapping[str, str]):
        self.field = field
        self._paths = dict(builtins)  # name -> "module:attribute", imported on first get
        self._factories: dict[str, Callable[..., Any]] = {}

    def names(self) -> tuple[str, ...]:
        """Every registered name, sorted."""
        return tuple(sorted({*self._paths, *self._factories}))

    def __contains__(self, name: object) -> bool:
        return name in self._paths or name in self._factories

    def register(self, name: str, factory: Callable[..., Any]) -> Callable[..., Any]:
        """Adds (or replaces) ``name``; returns ``factory``."""
        if not isinstance(name, str) or not name or name == CUSTOM:
            raise ValueError(
                f"{self.field}: a registered name must be a non-empty str, not {name!r}"
            )
        if not callable(factory):
            raise TypeError(f"{self.field}={name!r}: the factory must be callable")
        self._paths.pop(name, None)
        self._factories[name] = factory
        return factory

    def get(self, name: str) -> Callable[..., Any]:
        """The factory of ``name``; ValueError naming the field and the allowed values."""
        if name in self._factories:
            return self._factories[name]
        if name not in self._paths:
            raise ValueError(
                f"{self.field}={name!r} is unknown; allowed values: {list(self.names())}"
            )
        module, _, attribute = self._paths[name].partition(":")
        self._factories[name] = getattr(importlib.import_module(module), attribute)
        return self._factories[name]


MODELS = Registry(
    "model.name",
    {
        "mlp": "regime_jax.models:build_mlp",
        "cnn": "regime_jax.models:build_cnn",
        "transformer": "regime_jax.models:build_transformer",
        "resnet": "regime_jax.models:build_resnet",
        "gpt": "regime_jax.models:build_gpt",
    },
)
DATASETS = Registry(
    "dataset.name",
    {
        "mnist1d": "regime_jax.data:load_mnist1d",
        "digits": "regime_jax.data:load_digits",
        "mnist": "regime_jax.data:load_mnist",
        "fashion_mnist": "regime_jax.data:load_fashion_mnist",
        "cifar10": "regime_jax.data:load_cifar10",
        "synthetic_text": "regime_jax.data:load_synthetic_text",
        "tiny_shakespeare": "regime_jax.data:load_tiny_shakespeare",
    },
)
