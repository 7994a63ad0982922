"""A model as the three functions training needs, whatever API it was written in.

:func:`as_net` turns a Flax linen module, an initialized Flax NNX module, or a :class:`Net`
built by hand (plain JAX) into ``Net(init, apply, preacts_fn)``; ``preacts_fn`` is
:func:`regime_jax.capture_relus` of ``apply``, so no model needs editing.
:func:`nnx_apply` is the NNX one-liner on its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from regime_jax.capture import PreactsFn, capture_relus


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, jit-friendly
class Net:
    """``init(key, x) -> params``, ``apply(params, x) -> logits``, ``preacts_fn(params, x)``.

    Attributes:
      init: builds the trainable params from a PRNG key and an example batch ``x``.
      apply: the forward pass, ``apply(params, x) -> logits``.
      preacts_fn: ``preacts_fn(params, x) -> (logits, {layer: z})``.
      module: the object the net was made from (for display), or None.
    """

    init: Callable[[jax.Array, jax.Array], Any]
    apply: Callable[[Any, jax.Array], jax.Array]
    preacts_fn: PreactsFn
    module: Any = None


def nnx_apply(module: nnx.Module) -> tuple[Callable[[Any, jax.Array], Any], nnx.State]:
    """``(apply_fn, params)`` of an NNX module: split once, merge inside every call.

    ``params`` holds the module's ``nnx.Param`` variables (what an optimizer trains); every
    other variable (batch statistics, RNG state) is closed over as it is now.

    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> apply_fn, params = nnx_apply(model)
    >>> apply_fn(params, jax.numpy.ones((4, 3))).shape
    (4, 2)
    """
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def apply_fn(params: Any, x: jax.Array, *args: Any, **kwargs: Any) -> Any:
        return nnx.merge(graphdef, params, rest)(x, *args, **kwargs)

    return apply_fn, params


def is_model(obj: Any) -> bool:
    """Whether :func:`as_net` takes ``obj``: a Net, a linen module or an NNX module."""
    return isinstance(obj, Net | nn.Module | nnx.Module)


def as_net(model: Any) -> Net:
    """A :class:`Net` for a linen module, an NNX module or a Net (returned as is).

    A linen module's params come from ``model.init(key, x)["params"]``; an NNX module is
    already initialized, so its ``init`` ignores the key and returns its current params.
    """
    if isinstance(model, Net):
        return model
    if isinstance(model, nn.Module):
        apply_fn = lambda params, x: model.apply({"params": params}, x)
        init_fn = lambda key, x: model.init(key, x)["params"]
        return Net(init_fn, apply_fn, capture_relus(apply_fn), model)
    if isinstance(model, nnx.Module):
        apply_fn, params = nnx_apply(model)
        return Net(lambda key, x: params, apply_fn, capture_relus(apply_fn), model)
    raise TypeError(
        f"model={type(model).__name__} is not supported; pass a flax.linen.Module, an "
        f"initialized flax.nnx.Module, or regime_jax.models.Net(init, apply, preacts_fn)"
    )
