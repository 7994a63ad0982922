"""A model as the functions training needs, whatever API it was written in.

:func:`as_net` turns a Flax linen module, an initialized Flax NNX module, or a :class:`Net`
built by hand (plain JAX) into ``Net(init, apply, preacts_fn)``; ``preacts_fn`` is
:func:`regime_jax.capture_relus` of ``apply``, so no model needs editing. A model with a train
mode (a linen ``__call__`` taking ``train`` / ``training`` / ``deterministic``; an NNX module
with Dropout, BatchNorm or other non-parameter state) also gets :class:`Modes`: how the built-in
loop trains it (train mode, a dropout key per step, updated BatchNorm statistics) while
``apply`` and ``preacts_fn`` run it in eval mode.
:func:`nnx_apply` is the NNX one-liner on its own.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable
from typing import Any

import flax.errors
import flax.linen as nn
import jax
from flax import nnx

from regime_jax.analyzer import StateError
from regime_jax.capture import PreactsFn, capture_relus, key_names
from regime_jax.models.record import PREACTS

# linen __call__ arguments that set the mode; "deterministic" is True in eval mode.
MODE_FLAGS = ("train", "training", "deterministic")
# linen collections that are never model state: sow()'s default one and the recording site's.
_SOWN = ("intermediates", PREACTS)


@dataclasses.dataclass(frozen=True, eq=False)
class Modes:
    """How the built-in loop trains a model with a train mode, an RNG or non-parameter state.

    Attributes:
      init: ``init(key, x) -> (params, state)``: the trained params and the model's other
        variables, built in eval mode: linen's collections other than ``params`` (e.g.
        ``{"batch_stats": ...}``), an NNX module's non-``Param``, non-RNG state; empty if none.
      train: ``train(params, state, x, key) -> (out, state)``: the forward in train mode, its
        randomness (dropout) drawn from ``key``, with the state it updates (BatchNorm
        statistics).
      join: ``join(params, state) -> variables``, what :class:`Net`'s ``apply`` and
        ``preacts_fn`` take: linen ``{"params": params, **state}``, NNX the merged state.
      flag: how the mode is set, for messages: ``"train"``, ``"training"``, ``"deterministic"``
        (a linen ``__call__`` argument) or ``"nnx"`` (``module.train()`` / ``module.eval()``).
    """

    init: Callable[[jax.Array, Any], tuple[Any, Any]]
    train: Callable[[Any, Any, Any, jax.Array], tuple[Any, Any]]
    join: Callable[[Any, Any], Any]
    flag: str


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, jit-friendly
class Net:
    """``init(key, x) -> params``, ``apply(params, x) -> logits``, ``preacts_fn(params, x)``.

    Attributes:
      init: builds the trainable params from a PRNG key and an example batch ``x``.
      apply: the forward pass, ``apply(params, x) -> logits``.
      preacts_fn: ``preacts_fn(params, x) -> (logits, {layer: z})``.
      module: the object the net was made from (for display), or None.
      modes: for a model with a train mode (:class:`Modes`), or None. With ``modes``,
        ``apply`` and ``preacts_fn`` take ``modes.join(params, state)`` (the params with the
        model's other variables) and run eval mode; ``modes.init`` gives the state too.
    """

    init: Callable[[jax.Array, jax.Array], Any]
    apply: Callable[[Any, jax.Array], jax.Array]
    preacts_fn: PreactsFn
    module: Any = None
    modes: Modes | None = None


# ----------------------------------------------------------------------------- NNX


def _nnx_paths(state: Any) -> set[tuple]:
    """The variable paths of an NNX state (Variables or their bare values)."""
    flat = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )
    return {key_names(p) for p, _ in flat[0]}


def _show(paths: set[tuple], limit: int = 4) -> str:
    shown = sorted("/".join(map(str, p)) for p in paths)
    return ", ".join(shown[:limit]) + (f", ... ({len(shown)} in all)" if len(shown) > limit else "")


def _in_mode(graphdef: Any, *states: Any, train: bool) -> Any:
    """The graphdef of the module in train or eval mode (``module.train()`` / ``.eval()``)."""
    module = nnx.merge(graphdef, *states)  # new module objects: the user's module is untouched
    module.train() if train else module.eval()
    return nnx.graphdef(module)


def _fresh(tree: Any) -> Any:
    """New Variable objects for the same values: what a call mutates is its own copy (and is
    created in the caller's trace, so no ``TraceContextError``)."""
    return jax.tree.map(lambda a: a, tree)


def nnx_apply(module: nnx.Module) -> tuple[Callable[..., Any], nnx.State]:
    """``(apply_fn, state)`` of an NNX module: ``apply_fn(state, x)`` runs it in eval mode.

    ``state`` is ``nnx.state(module)``, the module's full state: its ``nnx.Param`` variables
    (what an optimizer trains), BatchNorm statistics, RNG state. ``apply_fn(state, x, *args,
    **kwargs)`` merges a fresh module from the ``state`` it is given (copies of its variables:
    no call mutates ``module`` or ``state``) and calls it, so nothing is frozen when
    ``nnx_apply`` is called: pass ``nnx.state(model)`` as it is now (after each optimizer step)
    to measure the model being trained.

    The forward runs in **eval mode** (``module.eval()``: Dropout deterministic, BatchNorm
    normalising with its running averages), whatever mode ``module`` is in: the probe forward
    of :func:`regime_jax.pattern_monitor` is deterministic and draws no RNG, so a module holding
    its dropout RNG (``nnx.Dropout(rate, rngs=rngs)``) works under ``capture_relus`` and jit.

    A state without the RNG variables (only drawn in train mode) is completed from the
    module's; a state lacking anything else (``nnx.state(module, nnx.Param)`` of a module with
    BatchNorm statistics) raises :class:`regime_jax.analyzer.StateError` naming what is missing.

    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> apply_fn, state = nnx_apply(model)
    >>> apply_fn(state, jax.numpy.ones((4, 3))).shape
    (4, 2)
    """
    graphdef, state = nnx.split(module)
    eval_graph = _in_mode(graphdef, state, train=False)
    rng_state = nnx.state(module, nnx.RngState)
    every, rngs = _nnx_paths(state), _nnx_paths(rng_state)
    needed, params = every - rngs, _nnx_paths(nnx.state(module, nnx.Param))

    def apply_fn(state: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        given = _nnx_paths(state)
        if needed - given or given - every or (given & rngs and rngs - given):
            raise StateError(_state_problem(given, every, needed, params, rngs))
        states = (state,) if rngs <= given else (state, rng_state)
        return nnx.merge(eval_graph, *_fresh(states))(x, *args, **kwargs)

    return apply_fn, state


def _state_problem(given, every, needed, params, rngs) -> str:
    missing, extra = needed - given, given - every
    if missing and given <= params | rngs:
        return (
            f"rj.nnx_apply's apply_fn got the nnx.Param state alone, but the module also holds "
            f"{_show(missing)}: pass its full state, nnx.state(model) (the second value "
            f"rj.nnx_apply returns), not nnx.state(model, nnx.Param)"
        )
    if missing:
        return (
            f"the state lacks {_show(missing)}, which the module holds: pass its full state, "
            f"nnx.state(model)"
        )
    if extra:
        return (
            f"the state holds {_show(extra)}, which the module does not: pass the state of the "
            f"module rj.nnx_apply was given, nnx.state(model)"
        )
    return (
        f"the state holds part of the module's RNG state ({_show(rngs & given)} but not "
        f"{_show(rngs - given)}): pass nnx.state(model), or leave the RNG state out entirely"
    )


def _has_modes(module: nnx.Module) -> bool:
    """Whether ``module.train()`` / ``.eval()`` change anything (Dropout, BatchNorm, ...)."""
    return any(
        isinstance(node, nnx.Module)
        and (hasattr(node, "deterministic") or hasattr(node, "use_running_average"))
        for _, node in nnx.iter_graph(module)
    )


def _leaves(tree: Any) -> bool:
    return bool(jax.tree.leaves(tree))


def _nnx_net(module: nnx.Module) -> Net:
    apply_fn, _ = nnx_apply(module)
    graphdef, params, rng_state, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
    if not (_has_modes(module) or _leaves(rng_state) or _leaves(rest)):  # parameters only
        return Net(lambda key, x: params, apply_fn, capture_relus(apply_fn), module)
    train_graph = _in_mode(graphdef, params, rng_state, rest, train=True)
    tags = sorted(
        {v.tag for _, v in nnx.to_flat_state(rng_state) if isinstance(v, nnx.RngKey)}, key=str
    )

    def train(params: Any, rest: Any, x: Any, key: jax.Array | None) -> tuple[Any, Any]:
        model = nnx.merge(train_graph, *_fresh((params, rng_state, rest)))
        if key is not None and tags:  # every stream reseeded from this step's key
            nnx.reseed(model, **{t: jax.random.fold_in(key, i) for i, t in enumerate(tags)})
        out = model(x)
        return out, nnx.split(model, nnx.Param, nnx.RngState, ...)[3]

    def join(params: Any, rest: Any) -> Any:
        return nnx.merge_state(params, rest) if _leaves(rest) else params

    modes = Modes(lambda key, x: (params, rest), train, join, "nnx")
    return Net(lambda key, x: params, apply_fn, capture_relus(apply_fn), module, modes)


# ----------------------------------------------------------------------------- linen


def mode_flag(model: nn.Module) -> str | None:
    """The argument of a linen module's ``__call__`` that sets its mode, if it has one."""
    try:
        names = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return None
    return next((f for f in MODE_FLAGS if f in names), None)


def _no_flag(model: nn.Module, what: str) -> ValueError:
    return ValueError(
        f"{type(model).__name__} {what} but its __call__ takes no `train` (or `training` / "
        f"`deterministic`) argument, so its mode cannot be set (train: dropout on, batch "
        f"statistics updated; eval: deterministic, running averages): add "
        f"`train: bool = False` to __call__ and pass it to its Dropout / BatchNorm"
    )


def _mode_error(model: nn.Module, flag: str | None, what: str) -> ValueError:
    if flag is None:
        return _no_flag(model, what)
    return ValueError(
        f"{type(model).__name__} {what} in eval mode ({flag}={flag == 'deterministic'}): eval "
        f"mode must be deterministic and only read its statistics; pass `{flag}` on to its "
        f"Dropout / BatchNorm"
    )


def _eval_reads(model: nn.Module, variables: Any, x: Any, flag: str | None) -> list[str]:
    """The collections besides ``params`` that the eval-mode forward reads (``batch_stats``),
    not those it only writes (``sow``): found by tracing (no compute), adding one missing
    collection at a time. ValueError naming the flag if that forward draws an RNG or updates a
    collection."""
    kwargs = {} if flag is None else {flag: flag == "deterministic"}
    have, read = {"params": variables["params"]}, []
    while True:
        try:
            jax.eval_shape(lambda v, x: model.apply(v, x, **kwargs), have, x)
            return read
        except flax.errors.ScopeCollectionNotFound as err:
            name = _collection(err)
            if name in have or name not in variables:
                raise
            have[name] = variables[name]
            read.append(name)
        except flax.errors.InvalidRngError as err:
            raise _mode_error(model, flag, "draws an RNG (dropout)") from err
        except flax.errors.ModifyScopeVariableError as err:
            raise _mode_error(model, flag, f"updates the collection {_collection(err)!r}") from err


def _collection(err: Exception) -> str | None:
    found = re.search(r'collection "([^"]+)"', str(err))
    return found.group(1) if found else None


def _linen_net(model: nn.Module) -> Net:
    flag = mode_flag(model)
    if flag is None:
        apply_fn = lambda params, x: model.apply({"params": params}, x)

        def init_fn(key: jax.Array, x: Any) -> Any:
            try:
                variables = model.init(key, x)
            except flax.errors.InvalidRngError as err:
                raise _no_flag(model, "draws an RNG (dropout)") from err
            read = _eval_reads(model, variables, x, None)
            if read:
                raise _no_flag(model, f"reads the collection(s) {read}")
            return variables["params"]

        return Net(init_fn, apply_fn, capture_relus(apply_fn), model)

    on, off = {flag: flag != "deterministic"}, {flag: flag == "deterministic"}

    def init(key: jax.Array, x: Any) -> tuple[Any, Any]:
        variables = model.init(key, x, **off)
        state = {k: variables[k] for k in _eval_reads(model, variables, x, flag)}
        return variables["params"], state

    def join(params: Any, state: Any) -> Any:
        return {"params": params, **state}

    def train(params: Any, state: Any, x: Any, key: jax.Array | None) -> tuple[Any, Any]:
        rngs = {} if key is None else {"dropout": key}
        if not state:
            return model.apply(join(params, state), x, rngs=rngs, **on), state
        out, new = model.apply(join(params, state), x, rngs=rngs, mutable=list(state), **on)
        return out, {k: new[k] for k in state}

    apply_fn = lambda variables, x: model.apply(variables, x, **off)
    modes = Modes(init, train, join, flag)
    return Net(lambda key, x: init(key, x)[0], apply_fn, capture_relus(apply_fn), model, modes)


# ----------------------------------------------------------------------------- any model


def with_activations(net: Net, activations: tuple[str, ...]) -> Net:
    """``net`` recording ``activations`` (:func:`regime_jax.capture_relus`'s opt-in): its
    ``preacts_fn`` is capture's of ``net.apply``; ReLU alone returns ``net`` as is."""
    if tuple(activations) == ("relu",):
        return net
    return dataclasses.replace(net, preacts_fn=capture_relus(net.apply, tuple(activations)))


def is_model(obj: Any) -> bool:
    """Whether :func:`as_net` takes ``obj``: a Net, a linen module or an NNX module."""
    return isinstance(obj, Net | nn.Module | nnx.Module)


def as_net(model: Any) -> Net:
    """A :class:`Net` for a linen module, an NNX module or a Net (returned as is).

    A linen module's params come from ``model.init(key, x)["params"]``; an NNX module is
    already initialized, so its ``init`` ignores the key and returns its current params.

    Train and eval mode (the built-in loop's :class:`Modes`):

    * linen: a module whose ``__call__`` takes ``train``, ``training`` or ``deterministic``
      (read from its signature) is initialised and evaluated with it in eval mode and trained
      with it in train mode, ``rngs={"dropout": key}`` and its non-param collections
      (``batch_stats``) mutable. A module without such an argument that holds a collection
      besides ``params`` or draws an RNG is refused at ``init`` (ValueError naming the flag).
    * NNX: a module with Dropout / BatchNorm (``module.train()`` changes something) or any
      non-``Param`` state is trained on a merged copy in ``train()`` mode, every RNG stream it
      holds reseeded from the step's key, and evaluated in ``eval()`` mode (:func:`nnx_apply`).

    A model with neither is the plain ``Net`` it always was.
    """
    if isinstance(model, Net):
        return model
    if isinstance(model, nn.Module):
        return _linen_net(model)
    if isinstance(model, nnx.Module):
        return _nnx_net(model)
    raise TypeError(
        f"model={type(model).__name__} is not supported; pass a flax.linen.Module, an "
        f"initialized flax.nnx.Module, or regime_jax.models.Net(init, apply, preacts_fn)"
    )
