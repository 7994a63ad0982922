"""The explicit recording site ``relu(site, z)``: the other way in, beside ``capture_relus``.

A model may call ``relu(site, z)`` instead of ``nn.relu(z)``, where ``site`` is the module
whose path names the layer. The built-in models pass the module that produced ``z`` (MLP:
``fc1``; Transformer FFN: ``block0/ffn/fc1``; CNN with ``norm="layer"``: ``norm1``), which is
the name :func:`regime_jax.capture_relus` gives the same ReLU, so both paths give the same
layers and bits (tested). The site sows the pre-activation ``z`` into the ``"preacts"``
collection at that path and returns ``nn.relu(z)`` (which capture recognises). A unit's bit
is ``z > 0``, :func:`regime_jax.bitmask.active`: exact zero is *off*. Sowing ``z`` (not only
its sign) lets the stability test read the margin ``|z|`` from the very same site.

Recording is free when not asked for: ``model.apply(params, x)`` ignores the sow, so the
outputs are identical with and without recording; ``model.apply(params, x,
mutable=[PREACTS])`` returns the pre-activations too. Layer keys are the module path joined
with ``/`` (``fc1``, ``conv2``, ``block0/ffn/fc1``).

The site is for ReLU: :func:`check_activation` refuses other activations with a clear
error, except where a model opts in (the Transformer's ``activation="gelu"`` / ``"silu"``,
through :func:`activate`, which records under ``<path>:<function>`` as
``capture_relus(..., activations=(...))`` keys it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from regime_jax import bitmask

PREACTS = "preacts"
_LEAF = "z"  # the sown variable's name; flatten_layers strips it so keys are module paths
RECORDABLE_ACTIVATIONS = ("relu",)
SIGN_ACTIVATIONS = ("relu", "gelu", "silu")  # a model that opts in (the Transformer's FFN)


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


def check_activation(
    activation: str, field: str, allowed: tuple[str, ...] = RECORDABLE_ACTIVATIONS
) -> None:
    """Raises ValueError unless ``activation`` is one the recording site defines patterns for."""
    if activation not in allowed:
        only = "ReLU only" if allowed == RECORDABLE_ACTIVATIONS else "these functions"
        raise ValueError(
            f"{field}={activation!r} cannot be recorded: activation patterns are defined for "
            f"{only}; allowed values: {list(allowed)}"
        )


def activate(site: nn.Module, z: jax.Array, fn: str) -> jax.Array:
    """:func:`relu` for ``fn`` in :data:`SIGN_ACTIVATIONS`: sows ``z`` at ``<path>:<fn>``
    (plain ``<path>`` for relu) and returns ``jax.nn.<fn>(z)`` (flax's default GELU, the tanh
    form), the bit being ``z > 0`` as for ReLU."""
    if fn == "relu":
        return relu(site, z)
    check_activation(fn, "activation", SIGN_ACTIVATIONS)
    site.sow(PREACTS, f"{_LEAF}:{fn}", z, reduce_fn=lambda _, new: new, init_fn=lambda: None)
    return getattr(nn, fn)(z)


def flatten_layers(tree: Mapping[str, Any], prefix: str = "") -> dict[str, jax.Array]:
    """Flattens a sown ``preacts`` collection into ``{"fc1": z, "block0/ffn": z}``."""
    out: dict[str, jax.Array] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten_layers(value, f"{prefix}/{key}" if prefix else key))
        elif key == _LEAF:
            out[prefix] = value
        elif key.startswith(f"{_LEAF}:"):  # activate(): the function named after the path
            out[prefix + key[len(_LEAF) :]] = value
        else:  # sown by something other than the site: keep its full path
            out[f"{prefix}/{key}" if prefix else key] = value
    return out


def preacts_of(model: nn.Module, params: Any, x: jax.Array) -> dict[str, jax.Array]:
    """Pre-activations of every site-recorded layer for inputs ``x`` (a pure function of params).

    Raises ``ValueError`` for a model with no ``relu(site, z)`` call: read such a model with
    :func:`regime_jax.capture_relus` instead (it needs no site).
    """
    return site_preacts_fn(model)(params, x)[1]


def patterns_of(preacts: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Boolean activation patterns ``z > 0`` (exact zero is off) for every layer."""
    return {k: bitmask.active(z) for k, z in preacts.items()}


def site_preacts_fn(model: nn.Module):
    """``preacts_fn(params, x) -> (logits, {layer: z})`` through the recording sites.

    The explicit path, beside :func:`regime_jax.capture_relus` (which needs no site): both
    give the same layers and bits on every built-in model (tested). Raises ``ValueError`` if
    the model records nothing.
    """

    def preacts_fn(params: Any, x: jax.Array, **kwargs: Any):
        out, state = model.apply({"params": params}, x, mutable=[PREACTS], **kwargs)
        preacts = flatten_layers(state.get(PREACTS, {}))
        if not preacts:
            raise ValueError(
                f"{type(model).__name__} has no recording site relu(site, z): read its ReLUs "
                f"with regime_jax.capture_relus(lambda params, x: model.apply("
                f"{{'params': params}}, x)) instead"
            )
        return out, preacts

    return preacts_fn
