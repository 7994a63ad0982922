"""Pure, jit-able pattern and step-size metrics over pytrees.

Patterns are dicts ``{layer: bitmask.Packed}`` (see :mod:`regime_jax.bitmask`). For a layer
with packed bits ``[P, positions..., ceil(U/8)]`` every quantity is defined over the
(probe example, position, unit) triples: positions are a CNN's spatial positions or a
Transformer's tokens (an MLP has none), so a conv channel at two positions is two sites.

* flip rate ``h^l = |b_t^l XOR b_{t-1}^l| / (P x positions x U_l)``; ``"all"`` pools every
  recorded bit of every layer (bits-weighted, not a mean of layer rates).
* dead (always-on) fraction of a layer: the fraction of its (position, unit) sites that are
  off (on) for every probe example.
* step sizes from the optimizer's updates ``u = theta_t - theta_{t-1}``: ``abs`` is
  ``||u^l||_2`` per top-level parameter subtree (``fc1``, ``block0``, ...) and ``||u||_2``
  over all parameters (``all``); ``rel`` divides by ``||theta_{t-1}||_2`` of the same part.

All functions work under ``jax.jit`` and on recorded masks after the fact.

>>> prev = {"fc1": Packed.from_bool(jnp.array([[True, False]]))}
>>> cur = {"fc1": Packed.from_bool(jnp.array([[True, True]]))}
>>> float(flip_rates(prev, cur)["all"])
0.5
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from regime_jax import bitmask
from regime_jax.bitmask import Packed
from regime_jax.models.record import patterns_of

Patterns = Mapping[str, Packed]


def flip_rates(prev: Patterns, cur: Patterns) -> dict[str, jax.Array]:
    """Per-layer and pooled (``"all"``) fraction of bits that differ between two patterns."""
    counts = {k: bitmask.flip_count(prev[k].bits, cur[k].bits, cur[k].units) for k in cur}
    total = sum(cur[k].num_bits for k in cur)
    out = {k: counts[k] / cur[k].num_bits for k in cur}
    out["all"] = sum(counts.values()) / total
    return out


def dead_fractions(cur: Patterns) -> dict[str, jax.Array]:
    """Per layer: fraction of (position, unit) sites off for every probe example."""
    return {k: bitmask.dead(p.bits, p.units) / _sites(p) for k, p in cur.items()}


def always_on_fractions(cur: Patterns) -> dict[str, jax.Array]:
    """Per layer: fraction of (position, unit) sites on for every probe example."""
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


def step_sizes(updates: Any, params_prev: Any) -> dict[str, jax.Array]:
    """``step/abs/<part>``, ``step/abs/all``, ``step/rel/<part>``, ``step/rel/all``.

    Args:
      updates: the optimizer's updates (same tree as params), ``theta_t - theta_{t-1}``.
      params_prev: ``theta_{t-1}``; parts are its top-level keys.
    """
    sq_u = {part: _squared_norm(updates[part]) for part in params_prev}
    sq_p = {part: _squared_norm(params_prev[part]) for part in params_prev}
    out = {}
    for part in params_prev:  # one pass over the parameters; "all" reuses the part sums
        out[f"step/abs/{part}"] = jnp.sqrt(sq_u[part])
        out[f"step/rel/{part}"] = jnp.sqrt(sq_u[part] / sq_p[part])
    out["step/abs/all"] = jnp.sqrt(sum(sq_u.values()))
    out["step/rel/all"] = jnp.sqrt(sum(sq_u.values()) / sum(sq_p.values()))
    return out


def _squared_norm(tree: Any) -> jax.Array:
    return sum(jnp.vdot(leaf, leaf) for leaf in jax.tree.leaves(tree))


def patterns_from_preacts(preacts: Mapping[str, jax.Array]) -> dict[str, Packed]:
    """Packs ``z > 0`` for every recorded layer (exact zero is off)."""
    return {k: Packed.from_bool(bits) for k, bits in patterns_of(preacts).items()}
