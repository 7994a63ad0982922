"""Pure, jit-able pattern and step-size metrics, and the optax-style :func:`pattern_monitor`.

Patterns are dicts ``{layer: bitmask.Packed}`` (see :mod:`regime_jax.bitmask`). For a layer
with packed bits ``[P, positions..., ceil(U/8)]`` every quantity is defined over the
(probe example, position, unit) triples: positions are a CNN's spatial positions or a
Transformer's tokens (an MLP has none), so a conv channel at two positions is two sites.

* a unit's bit is ``z > 0`` (:func:`regime_jax.bitmask.active`; exact zero is off).
* flip rate ``h^l = |b_t^l XOR b_{t-1}^l| / (P x positions x U_l)``; ``"all"`` pools every
  recorded bit of every layer (bits-weighted, not a mean of layer rates).
* dead (always-on) fraction of a layer: the fraction of its (position, unit) sites that are
  off (on) for every probe example.
* step sizes from the optimizer's updates ``u = theta_t - theta_{t-1}``: ``abs`` is
  ``||u^l||_2`` per parameter part and ``||u||_2`` over all parameters (``all``); ``rel``
  divides by ``||theta_{t-1}||_2`` of the same part. Parts are the top-level entries of the
  params tree (``fc1``, ``block0``; list indices ``0``, ``1``), looking through a tree that
  has a single top-level entry (linen's ``{"params": ...}``); a bare array is part ``all``.

All functions work under ``jax.jit`` and on recorded masks after the fact. A measurement of
nothing is an error: patterns with no layer, or a layer with no bit, raise ``ValueError``.

>>> prev = {"fc1": Packed.from_bool(jnp.array([[True, False]]))}
>>> cur = {"fc1": Packed.from_bool(jnp.array([[True, True]]))}
>>> float(flip_rates(prev, cur)["all"])
0.5
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from regime_jax import bitmask
from regime_jax.bitmask import Packed, Patterns
from regime_jax.capture import CaptureError


def _check_patterns(cur: Patterns) -> None:
    if not cur:
        raise ValueError("no ReLU layer to measure: the patterns are empty")
    empty = [k for k, p in cur.items() if p.num_bits == 0]
    if empty:
        raise ValueError(f"layers {empty} have no bits (an empty probe set or zero units)")


def flip_rates(prev: Patterns, cur: Patterns) -> dict[str, jax.Array]:
    """Per-layer and pooled (``"all"``) fraction of bits that differ between two patterns."""
    _check_patterns(cur)
    if set(prev) != set(cur):
        raise ValueError(f"patterns have different layers: {sorted(prev)} vs {sorted(cur)}")
    counts = {k: bitmask.flip_count(prev[k].bits, cur[k].bits, cur[k].units) for k in cur}
    total = sum(cur[k].num_bits for k in cur)
    out = {k: counts[k] / cur[k].num_bits for k in cur}
    out["all"] = sum(counts.values()) / total
    return out


def dead_fractions(cur: Patterns) -> dict[str, jax.Array]:
    """Per layer: fraction of (position, unit) sites off for every probe example."""
    _check_patterns(cur)
    return {k: bitmask.dead(p.bits, p.units) / _sites(p) for k, p in cur.items()}


def always_on_fractions(cur: Patterns) -> dict[str, jax.Array]:
    """Per layer: fraction of (position, unit) sites on for every probe example."""
    _check_patterns(cur)
    return {k: bitmask.always_on(p.bits, p.units) / _sites(p) for k, p in cur.items()}


def _sites(p: Packed) -> int:
    return bitmask.num_bits(p.bits.shape[1:], p.units)


def pattern_metrics(prev: Patterns | None, cur: Patterns) -> dict[str, jax.Array]:
    """``flip/<layer>``, ``flip/all`` (when ``prev`` is given), ``dead/..``, ``always_on/..``."""
    out = {}
    if prev is not None:
        out.update({f"flip/{k}": v for k, v in flip_rates(prev, cur).items()})
    out.update({f"dead/{k}": v for k, v in dead_fractions(cur).items()})
    out.update({f"always_on/{k}": v for k, v in always_on_fractions(cur).items()})
    return out


def param_parts(tree: Any) -> dict[str, Any]:
    """The parts step sizes are reported for: ``{name: subtree}`` (see the module docstring).

    >>> sorted(param_parts({"params": {"fc1": 1.0, "head": 2.0}}))
    ['fc1', 'head']
    >>> sorted(param_parts([jnp.ones(2), jnp.ones(3)]))
    ['0', '1']
    """
    while True:
        children = _children(tree)
        if children is None:
            return {"all": tree}
        if len(children) != 1:
            return children
        (tree,) = children.values()


def _children(tree: Any) -> dict[str, Any] | None:
    if isinstance(tree, Mapping):
        return {str(k): tree[k] for k in tree}
    if isinstance(tree, list | tuple) and not hasattr(tree, "_fields"):
        return {str(i): v for i, v in enumerate(tree)}
    return None


def squared_norms(tree: Any) -> dict[str, jax.Array]:
    """``||part||_2^2`` for every part of :func:`param_parts` (what step sizes divide by)."""
    return {part: _squared_norm(sub) for part, sub in param_parts(tree).items()}


def step_sizes(updates: Any, params_prev: Any) -> dict[str, jax.Array]:
    """``step/abs/<part>``, ``step/abs/all``, ``step/rel/<part>``, ``step/rel/all``.

    Args:
      updates: the optimizer's updates (same tree as params), ``theta_t - theta_{t-1}``.
      params_prev: ``theta_{t-1}``.
    """
    return step_sizes_from_norms(updates, squared_norms(params_prev))


def step_sizes_from_norms(updates: Any, sq_p: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """:func:`step_sizes` given ``squared_norms(theta_{t-1})`` (what the monitor carries)."""
    sq_u = squared_norms(updates)
    if set(sq_u) != set(sq_p):
        raise ValueError(
            f"updates have parts {sorted(sq_u)} but params have {sorted(sq_p)}: pass updates "
            f"of the same tree as params (theta_t - theta_(t-1))"
        )
    out = {}
    for part in sq_p:  # one pass over the parameters; "all" reuses the part sums
        out[f"step/abs/{part}"] = jnp.sqrt(sq_u[part])
        out[f"step/rel/{part}"] = jnp.sqrt(sq_u[part] / sq_p[part])
    out["step/abs/all"] = jnp.sqrt(sum(sq_u.values()))
    out["step/rel/all"] = jnp.sqrt(sum(sq_u.values()) / sum(sq_p.values()))
    return out


def _squared_norm(tree: Any) -> jax.Array:
    return sum(jnp.vdot(leaf, leaf) for leaf in jax.tree.leaves(tree))


def patterns_from_preacts(preacts: Mapping[str, jax.Array]) -> dict[str, Packed]:
    """Packs the bit ``z > 0`` of every layer's pre-activation ``z`` (exact zero is off)."""
    return {k: Packed.from_bool(bitmask.active(z)) for k, z in preacts.items()}


# ----------------------------------------------------------------------------- the monitor


class MonitorState(NamedTuple):
    """What :func:`pattern_monitor` carries between updates (a pytree; donate it freely).

    Attributes:
      masks: packed patterns ``{layer: Packed}`` of the probe set at the last pattern update
        (1 bit per unit per probe example and position).
      sq_norms: ``{part: ||theta||_2^2}`` of the parameters at the last update (the
        denominators of the next ``step/rel/*``).
    """

    masks: dict[str, Packed]
    sq_norms: dict[str, jax.Array]


class PatternMonitor(NamedTuple):
    """An optax-style pure pair; see :func:`pattern_monitor`."""

    init: Callable[[Any], MonitorState]
    update: Callable[..., tuple[dict[str, jax.Array], MonitorState]]


def pattern_monitor(
    preacts_fn: Callable[..., tuple[Any, Mapping[str, jax.Array]]], probe_x: Any, **kwargs: Any
) -> PatternMonitor:
    """Flip rates, dead / always-on fractions and step sizes of any model, as ``init, update``.

    Args:
      preacts_fn: ``preacts_fn(params, x, **kwargs) -> (out, {layer: z})``, from
        :func:`regime_jax.capture_relus` (any model) or a built-in model's recording site.
      probe_x: the fixed probe inputs ``[P, ...]`` (P >= 1), e.g. validation examples.
      **kwargs: passed to every ``preacts_fn`` call (``train=False``).

    Returns:
      ``PatternMonitor(init, update)``, both pure and jit-able, with no host sync:
        ``init(params) -> MonitorState``: the probe patterns at ``params`` (step 0).
        ``update(state, params, updates, *, patterns=True, probe_x=None) -> (metrics,
        state)``: call after the optimizer update with the *new* params and the updates
        ``theta_t - theta_{t-1}`` (optax's ``updates``; same tree as params). ``metrics`` has
        the keys of ``metrics.jsonl``: ``step/abs/<part>``, ``step/abs/all``,
        ``step/rel/<part>``, ``step/rel/all`` always; with ``patterns=True`` (a static
        Python bool) also ``flip/<layer>``, ``flip/all`` (against the patterns in
        ``state``), ``dead/<layer>`` and ``always_on/<layer>``. ``patterns=False`` skips the
        probe forward and carries the old patterns. ``probe_x`` overrides the probe inputs
        (same shape), e.g. to pass them as a jit argument or sharded.

    Raises:
      ValueError: at ``init``, for an empty ``probe_x``, a ``probe_x`` that ``preacts_fn``
        cannot take, no ReLU, or a pre-activation whose leading axis is not the probe axis.

    >>> import jax, jax.numpy as jnp, optax
    >>> from regime_jax.capture import capture_relus
    >>> apply_fn = lambda p, x: jnp.maximum(x @ p["w"], 0.0).sum(-1)
    >>> params, x = {"w": jnp.ones((3, 4))}, jnp.arange(6.0).reshape(2, 3) - 2
    >>> monitor = pattern_monitor(capture_relus(apply_fn), x)
    >>> state = monitor.init(params)
    >>> updates = {"w": -0.1 * jnp.ones((3, 4))}
    >>> metrics, state = monitor.update(state, optax.apply_updates(params, updates), updates)
    >>> sorted(metrics)[:3]
    ['always_on/relu_0', 'dead/relu_0', 'flip/all']
    """
    default_x = probe_x

    def probe_patterns(params: Any, x: Any) -> dict[str, Packed]:
        return patterns_from_preacts(preacts_fn(params, x, **kwargs)[1])

    def init(params: Any) -> MonitorState:
        _check_probe(preacts_fn, params, default_x, kwargs)
        return MonitorState(probe_patterns(params, default_x), squared_norms(params))

    def update(
        state: MonitorState,
        params: Any,
        updates: Any,
        *,
        patterns: bool = True,
        probe_x: Any = None,
    ) -> tuple[dict[str, jax.Array], MonitorState]:
        metrics = step_sizes_from_norms(updates, state.sq_norms)
        masks = state.masks
        if patterns:
            masks = probe_patterns(params, default_x if probe_x is None else probe_x)
            metrics.update(pattern_metrics(state.masks, masks))
        return metrics, MonitorState(masks, squared_norms(params))

    return PatternMonitor(init, update)


def _check_probe(preacts_fn, params, probe_x, kwargs) -> None:
    """probe_x: an array (or a pytree of arrays, for multi-input models) with P >= 1 rows."""
    leaves = jax.tree.leaves(probe_x)
    shapes = [getattr(leaf, "shape", None) for leaf in leaves]
    if not leaves or any(s is None or len(s) == 0 for s in shapes):
        raise ValueError(
            f"probe_x has shape {getattr(probe_x, 'shape', None)}: it must be a non-empty array "
            f"[P, ...] of probe inputs (or a pytree of such arrays)"
        )
    if len({s[0] for s in shapes}) != 1 or shapes[0][0] == 0:
        what = f"shape {tuple(shapes[0])}" if len(shapes) == 1 else f"leading sizes {shapes}"
        raise ValueError(
            f"probe_x has {what}: it must be non-empty, with the same number P >= 1 of probe "
            f"examples on axis 0 of every input"
        )
    shape = shapes[0] if len(shapes) == 1 else (shapes[0][0], "...")
    try:
        _, preacts = jax.eval_shape(lambda p, x: preacts_fn(p, x, **kwargs), params, probe_x)
    except CaptureError:
        raise
    except Exception as err:  # whatever the model raises for inputs it cannot take
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"probe_x with shape {tuple(shape)} cannot be passed to the model: {first}"
        ) from err
    if not preacts:
        raise ValueError("the model records no ReLU pre-activation: nothing to monitor")
    for name, z in preacts.items():
        if len(z.shape) < 2 or z.shape[0] != shape[0]:
            raise ValueError(
                f"layer {name!r} has pre-activations of shape {tuple(z.shape)}; expected "
                f"[P={shape[0]}, ..., units] with the probe examples on the leading axis"
            )
