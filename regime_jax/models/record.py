"""The one recording site every ReLU in regime_jax goes through.

A model calls ``relu(site, z)`` instead of ``nn.relu(z)``, where ``site`` is the module whose
path names the layer: usually the Dense/Conv that produced ``z`` (MLP: ``fc1``), or the
calling module itself (Transformer FFN: ``block0/ffn``). The site sows the pre-activation
``z`` into the ``"preacts"`` collection at that path and returns ``relu(z)``. A unit's bit
is ``z > 0``: exact zero is *off*. Sowing ``z`` (not only its sign) lets the stability probe
read the margin ``|z|`` from the very same site; the bit is taken in :func:`patterns_of`
(and, packed, in ``analyzer.patterns_from_preacts``).

Recording is free when not asked for: ``model.apply(params, x)`` ignores the sow, so the
outputs are identical with and without recording; ``model.apply(params, x,
mutable=[PREACTS])`` returns the pre-activations too. Layer keys are the module path joined
with ``/`` (``fc1``, ``conv2``, ``block0/ffn``).

The site is *only* for ReLU: patterns are not defined for other activations, and
:func:`check_activation` refuses them with a clear error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

PREACTS = "preacts"
_LEAF = "z"  # the sown variable's name; flatten_layers strips it so keys are module paths
RECORDABLE_ACTIVATIONS = ("relu",)


def relu(site: nn.Module, z: jax.Array) -> jax.Array:
    """Sows the pre-activation ``z`` (units on the last axis) at ``site``'s path; returns relu(z).

    Args:
      site: a bound linen module; its path is the layer key (``fc1``, ``block0/ffn``).
      z: pre-activation ``[batch, positions..., units]``.

    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     dense = nn.Dense(4, name="fc1")
    ...     return relu(dense, dense(x))  # recorded as "fc1"
    """
    site.sow(PREACTS, _LEAF, z, reduce_fn=lambda _, new: new, init_fn=lambda: None)
    return nn.relu(z)


def check_activation(activation: str, field: str) -> None:
    """Raises ValueError unless ``activation`` is one the recording site defines patterns for."""
    if activation not in RECORDABLE_ACTIVATIONS:
        raise ValueError(
            f"{field}={activation!r} cannot be recorded: activation patterns are defined for "
            f"ReLU only; allowed values: {list(RECORDABLE_ACTIVATIONS)}"
        )


def flatten_layers(tree: Mapping[str, Any], prefix: str = "") -> dict[str, jax.Array]:
    """Flattens a sown ``preacts`` collection into ``{"fc1": z, "block0/ffn": z}``."""
    out: dict[str, jax.Array] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten_layers(value, f"{prefix}/{key}" if prefix else key))
        elif key == _LEAF:
            out[prefix] = value
        else:  # sown by something other than the site: keep its full path
            out[f"{prefix}/{key}" if prefix else key] = value
    return out


def preacts_of(model: nn.Module, params: Any, x: jax.Array) -> dict[str, jax.Array]:
    """Pre-activations of every recorded layer for inputs ``x`` (a pure function of params)."""
    _, state = model.apply({"params": params}, x, mutable=[PREACTS])
    return flatten_layers(state.get(PREACTS, {}))


def patterns_of(preacts: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Boolean activation patterns ``z > 0`` (exact zero is off) for every layer."""
    return {k: jnp.greater(z, 0) for k, z in preacts.items()}
