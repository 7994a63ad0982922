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
* every rate has its exact integer count beside it: ``flip_count/<layer>``,
  ``flip_count/all``, ``dead_count/<layer>``, ``always_on_count/<layer>`` (bits that
  flipped; sites dead; sites always on). The denominators are static (:func:`denominators`):
  ``P x positions x U_l`` bits per layer for flips (their sum for ``all``), ``positions x
  U_l`` sites for dead / always-on. Each rate is ``np.float32(count / denominator)`` exactly,
  eagerly, under jit and on every backend (:func:`regime_jax.bitmask.rate`: the quotient is
  rounded in integer arithmetic, not by a float32 division that XLA may turn into a
  multiplication by a rounded reciprocal). On device a count is an int32 scalar when its
  denominator is below 2^31 (it cannot overflow), else a uint32 ``[2]`` pair ``(hi, lo)``
  (exact below 2^64); the built-in loop writes every count to ``metrics.jsonl`` as an exact
  Python int (:func:`counts_to_int`; in a loop of your own, :func:`regime_jax.bitmask.count_int`
  of a fetched value).
* step sizes from the optimizer's updates ``u = theta_t - theta_{t-1}``: ``abs`` is
  ``||u^l||_2`` per parameter part and ``||u||_2`` over all parameters (``all``); ``rel``
  divides by ``||theta_{t-1}||_2`` of the same part. Parts are the top-level entries of the
  params tree (``fc1``, ``block0``; list indices ``0``, ``1``), looking through a tree that
  has a single top-level entry (linen's ``{"params": ...}``); a bare array is part ``all``.
  Only the trained parameters count: of a model's variables (linen ``{"params", "batch_stats"}``,
  an NNX state with BatchNorm statistics and RNG state) the part the updates cover
  (:func:`trained_part`).

All functions work under ``jax.jit`` and on recorded masks after the fact. A measurement of
nothing is an error: patterns with no layer, or a layer with no bit, raise ``ValueError``.

>>> prev = {"fc1": Packed.from_bool(jnp.array([[True, False]]))}
>>> cur = {"fc1": Packed.from_bool(jnp.array([[True, True]]))}
>>> float(flip_rates(prev, cur)["all"])
0.5
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from regime_jax import bitmask
from regime_jax.bitmask import Packed, Patterns
from regime_jax.capture import CaptureError, key_names


def _check_patterns(cur: Patterns) -> None:
    if not cur:
        raise ValueError("no ReLU layer to measure: the patterns are empty")
    empty = [k for k, p in cur.items() if p.num_bits == 0]
    if empty:
        raise ValueError(f"layers {empty} have no bits (an empty probe set or zero units)")


def flip_counts(prev: Patterns, cur: Patterns) -> dict[str, jax.Array]:
    """Per-layer and pooled (``"all"``) number of bits that differ: exact Counts
    (:mod:`regime_jax.bitmask`: int32 below 2^31 bits, else uint32 ``(hi, lo)``)."""
    _check_patterns(cur)
    if set(prev) != set(cur):
        raise ValueError(f"patterns have different layers: {sorted(prev)} vs {sorted(cur)}")
    out = {k: bitmask.flip_count(prev[k].bits, cur[k].bits, cur[k].units) for k in cur}
    out["all"] = bitmask.add_counts(list(out.values()), sum(p.num_bits for p in cur.values()))
    return out


def dead_counts(cur: Patterns) -> dict[str, jax.Array]:
    """Per layer: number of (position, unit) sites off for every probe example (exact)."""
    _check_patterns(cur)
    return {k: bitmask.dead(p.bits, p.units) for k, p in cur.items()}


def always_on_counts(cur: Patterns) -> dict[str, jax.Array]:
    """Per layer: number of (position, unit) sites on for every probe example (exact)."""
    _check_patterns(cur)
    return {k: bitmask.always_on(p.bits, p.units) for k, p in cur.items()}


def flip_rates(prev: Patterns, cur: Patterns) -> dict[str, jax.Array]:
    """Per-layer and pooled (``"all"``) fraction of bits that differ between two patterns."""
    return _rates(flip_counts(prev, cur), _flip_bits(cur))


def dead_fractions(cur: Patterns) -> dict[str, jax.Array]:
    """Per layer: fraction of (position, unit) sites off for every probe example."""
    return _rates(dead_counts(cur), {k: _sites(p) for k, p in cur.items()})


def always_on_fractions(cur: Patterns) -> dict[str, jax.Array]:
    """Per layer: fraction of (position, unit) sites on for every probe example."""
    return _rates(always_on_counts(cur), {k: _sites(p) for k, p in cur.items()})


def _sites(p: Packed) -> int:
    return bitmask.num_bits(p.bits.shape[1:], p.units)


def _flip_bits(cur: Patterns) -> dict[str, int]:
    bits = {k: p.num_bits for k, p in cur.items()}
    return {**bits, "all": sum(bits.values())}


def _rates(counts: Mapping[str, jax.Array], bits: Mapping[str, int]) -> dict[str, jax.Array]:
    """``{key: bitmask.rate(counts[key], bits[key])}``, in one elementwise pass over them all
    (counts stacked as ``(hi, lo)`` limbs; one fusion, however many layers)."""
    keys = list(counts)
    if all(jnp.shape(counts[k]) == () for k in keys):  # int32 counts: int32 [n]
        stacked = jnp.stack([counts[k] for k in keys])
    else:  # some (hi, lo) pairs: all as uint32 [n, 2]
        stacked = jnp.stack([jnp.stack(bitmask.limbs(counts[k])) for k in keys])
    rates = bitmask.rate(stacked, [bits[k] for k in keys])
    return {k: rates[i] for i, k in enumerate(keys)}


# Rate key prefix -> its count's prefix: ``flip/fc1`` has ``flip_count/fc1``.
COUNT_PREFIXES = {"flip/": "flip_count/", "dead/": "dead_count/", "always_on/": "always_on_count/"}


def denominators(cur: Patterns, *, flips: bool = True) -> dict[str, int]:
    """The static denominator of every rate key of :func:`pattern_metrics` (Python ints).

    ``flip/<layer>``: the layer's bits, ``P x positions x units``; ``flip/all``: their sum;
    ``dead/<layer>`` and ``always_on/<layer>``: its sites, ``positions x units``. Each rate is
    ``np.float32(count / denominator)``, e.g. ``metrics["flip/fc1"] ==
    np.float32(metrics["flip_count/fc1"] / denominators(masks)["flip/fc1"])``.
    """
    out = {f"flip/{k}": v for k, v in _flip_bits(cur).items()} if flips else {}
    for prefix in ("dead/", "always_on/"):
        out.update({f"{prefix}{k}": _sites(p) for k, p in cur.items()})
    return out


def pattern_metrics(prev: Patterns | None, cur: Patterns) -> dict[str, jax.Array]:
    """``flip/<layer>``, ``flip/all`` (when ``prev`` is given), ``dead/..``, ``always_on/..``,
    then their exact counts: ``flip_count/<layer>``, ``flip_count/all``, ``dead_count/..``,
    ``always_on_count/..`` (bitmask Counts: int32 scalars below 2^31 bits, else uint32
    ``(hi, lo)`` pairs, which :func:`counts_to_int` makes Python ints on the host).

    Each rate is ``np.float32(count / denominator)`` exactly (:func:`denominators`), on every
    backend and under jit (:func:`regime_jax.bitmask.rate`). The rate keys come first, in the
    order they always had; the count keys follow them.
    """
    counts = {}
    if prev is not None:
        counts.update({f"flip/{k}": v for k, v in flip_counts(prev, cur).items()})
    counts.update({f"dead/{k}": v for k, v in dead_counts(cur).items()})
    counts.update({f"always_on/{k}": v for k, v in always_on_counts(cur).items()})
    out = _rates(counts, denominators(cur, flips=prev is not None))
    out.update({count_key(k): v for k, v in counts.items()})
    return out


def count_key(rate_key: str) -> str:
    """The count key beside a rate key: ``flip/fc1`` -> ``flip_count/fc1``."""
    for rate_prefix, count_prefix in COUNT_PREFIXES.items():
        if rate_key.startswith(rate_prefix):
            return count_prefix + rate_key.removeprefix(rate_prefix)
    raise ValueError(f"{rate_key!r} is not a pattern rate key ({sorted(COUNT_PREFIXES)})")


def counts_to_int(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A fetched metrics row with every count key (``flip_count/..``, ``dead_count/..``,
    ``always_on_count/..``) an exact Python int (:func:`regime_jax.bitmask.count_int`);
    other keys as they are. What the built-in loop writes to ``metrics.jsonl``."""
    counts = tuple(COUNT_PREFIXES.values())
    return {k: bitmask.count_int(v) if k.startswith(counts) else v for k, v in metrics.items()}


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
            f"updates have parts {sorted(sq_u)} but the norms are of parts {sorted(sq_p)}: pass "
            f"updates of the same tree as the trained params (theta_t - theta_(t-1)); with a "
            f"monitor whose variables hold more than the trained params (batch_stats, RNG "
            f"state), initialise it with init(variables, params=<what the optimizer trains>)"
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


def trained_part(variables: Any, updates: Any) -> Any:
    """The part of ``variables`` that ``updates`` cover, in the tree structure of ``updates``.

    Matched by tree path (static; no array is read): the update leaf at path ``u`` is the
    variable leaf at ``prefix + u``, one prefix for all leaves: none for an NNX state (whose
    ``nnx.Param`` paths are those of ``nnx.Optimizer.update``'s updates), ``("params",)`` for
    linen's ``{"params": ..., "batch_stats": ...}``. An NNX ``Variable``'s trailing ``.value``
    is looked through on either side. ``variables`` of the same structure as ``updates`` are
    returned as they are (the plain case: params are the variables).

    Raises:
      ValueError: an update path that ``variables`` do not hold under any one prefix, two
        prefixes that both hold every update path, or a leaf of another shape.

    >>> variables = {"params": {"w": jnp.ones(2)}, "batch_stats": {"mean": jnp.zeros(2)}}
    >>> trained_part(variables, {"w": jnp.ones(2)})
    {'w': Array([1., 1.], dtype=float32)}
    """
    if jax.tree.structure(variables) == jax.tree.structure(updates):
        return variables
    held = _leaves_by_path(variables)
    wanted, treedef = jax.tree_util.tree_flatten_with_path(updates)
    paths = [key_names(p) for p, _ in wanted]
    if not paths:
        raise ValueError("updates have no leaf: there is no trained parameter to measure")
    first = paths[0]
    prefixes = {p[: len(p) - len(first)] for p in held if p[len(p) - len(first) :] == first}
    found = sorted(
        (pre for pre in prefixes if all(pre + u in held for u in paths)), key=lambda p: len(p)
    )
    if not found:
        missing = next((u for u in paths if not any(pre + u in held for pre in prefixes)), first)
        tops = sorted({str(p[0]) for p in held if p})
        raise ValueError(
            f"updates have a leaf at {'/'.join(map(str, missing))} that the variables do not "
            f"hold (their top-level entries: {tops}): pass the variables the model takes and "
            f"updates of their trained part (the optimizer's updates of what it trains)"
        )
    if len(found) > 1:
        raise ValueError(
            f"updates match the variables under several prefixes "
            f"{['/'.join(map(str, p)) or '<root>' for p in found]}: pass the trained params to "
            f"init(variables, params=...) and updates of exactly that part"
        )
    (pre,) = found
    leaves = []
    for (_, u), key in zip(wanted, paths, strict=True):
        v = held[pre + key]
        if jnp.shape(v) != jnp.shape(u):
            raise ValueError(
                f"the update at {'/'.join(map(str, key))} has shape {jnp.shape(u)} but the "
                f"variable there has shape {jnp.shape(v)}"
            )
        leaves.append(v)
    return jax.tree.unflatten(treedef, leaves)


def _leaves_by_path(tree: Any) -> dict[tuple, Any]:
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out.setdefault(key_names(keypath), leaf)
    return out


def patterns_from_preacts(preacts: Mapping[str, jax.Array]) -> dict[str, Packed]:
    """Packs the bit ``z > 0`` of every layer's pre-activation ``z`` (exact zero is off)."""
    return {k: Packed.from_bool(bitmask.active(z)) for k, z in preacts.items()}


# The auto probe chunk: examples per chunk so that one chunk's pre-activations (the recorded
# layers' z, at their dtype) stay within this many bytes; a probe set whose pre-activations fit
# runs in one pass (the program it always was). Chosen with experiments/bench_memory.py
# (docs/guide/scale.md, "Memory").
PROBE_CHUNK_BYTES = 64 * 2**20


def probe_chunk_size(example_bytes: int, num_examples: int, probe_chunk: int | str | None) -> int:
    """Examples per chunk of the probe forward (``num_examples``: one pass, no chunking).

    ``probe_chunk``: an int ``N >= 1`` (at most ``N`` per chunk), ``"auto"`` (so that a chunk's
    pre-activations, ``example_bytes`` per example, stay within :data:`PROBE_CHUNK_BYTES`), or
    None (one pass). The chunks are then made equal: ``n = ceil(P / N)`` chunks of
    ``ceil(P / n)`` examples.

    >>> probe_chunk_size(2**20, 512, "auto"), probe_chunk_size(2**20, 32, "auto")
    (64, 32)
    """
    if probe_chunk is None:
        return num_examples
    if probe_chunk == "auto":
        probe_chunk = max(1, PROBE_CHUNK_BYTES // max(example_bytes, 1))
    elif isinstance(probe_chunk, bool) or not isinstance(probe_chunk, int) or probe_chunk < 1:
        raise ValueError(f"probe_chunk={probe_chunk!r}; allowed values: an int >= 1, 'auto', None")
    if probe_chunk >= num_examples:
        return num_examples
    n = -(-num_examples // probe_chunk)
    return -(-num_examples // n)


def chunked_patterns(
    patterns_fn: Callable[[Any], Mapping[str, Packed]], x: Any, chunk: int
) -> dict[str, Packed]:
    """``patterns_fn(x)`` computed ``chunk`` examples at a time, the same bits.

    ``patterns_fn(x_chunk) -> {layer: Packed [chunk, ...]}`` must treat examples independently
    (a probe forward in eval mode). Chunk ``j`` of ``n = ceil(P / chunk)`` holds the examples
    ``i * n + j`` (strided, so a probe set sharded on its leading axis stays sharded: each
    device runs its own examples of every chunk); a ``lax.fori_loop`` writes each chunk's
    packed masks into one ``[chunk, n, ...]`` buffer, read back as ``[P, ...]``. ``P`` not a
    multiple of the chunk: the last ``chunk * n - P`` (< n) slots take copies of the first
    examples and are dropped. Memory: the masks plus one chunk's forward, whatever ``P``.
    """
    num = jax.tree.leaves(x)[0].shape[0]
    if chunk >= num:
        return dict(patterns_fn(x))
    n = -(-num // chunk)
    pad = chunk * n - num

    def strided(a):
        if pad:
            a = jnp.concatenate([a, a[:pad]])
        return a.reshape(chunk, n, *a.shape[1:])

    xs = jax.tree.map(strided, x)
    take = lambda j: jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, j, 1, False), xs)
    like = jax.eval_shape(patterns_fn, take(0))
    bufs = {k: jnp.zeros((chunk, n, *p.bits.shape[1:]), p.bits.dtype) for k, p in like.items()}

    def body(j, bufs):
        got = patterns_fn(take(j))
        return {
            k: lax.dynamic_update_index_in_dim(buf, got[k].bits, j, 1) for k, buf in bufs.items()
        }

    bufs = lax.fori_loop(0, n, body, bufs)
    return {
        k: Packed(buf.reshape(chunk * n, *buf.shape[2:])[:num], like[k].units)
        for k, buf in bufs.items()
    }


# ------------------------------------------------------------------------------ sampling


def sample_indices(
    shapes: Mapping[str, Sequence[int]], units: int | None, positions: int | None, seed: int = 0
) -> dict[str, dict[str, np.ndarray | None]]:
    """The fixed random subset of every layer that a sampled monitor records.

    Args:
      shapes: ``{layer: [P, positions..., U]}``, the pre-activations' shapes.
      units: units kept per layer (``k`` of ``U``, the same for every position and example);
        None (or ``>= U``): all.
      positions: positions kept per layer (``m`` of the ``S = prod(positions...)``
        flattened positions, the same for every example); None, ``>= S`` or a layer with no
        position axis: all.
      seed: with the layer's name, what picks them (``np.random.default_rng([seed,
        crc32(name)])``: the same run, the same indices; another layer, other indices).

    Returns:
      ``{layer: {"units": int [k] sorted | None, "positions": int [m] sorted | None}}``
      (None: all kept).
    """
    out = {}
    for name, shape in shapes.items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        u, s = int(shape[-1]), int(np.prod(shape[1:-1], dtype=np.int64))
        keep_u = np.sort(rng.choice(u, units, replace=False)) if units and units < u else None
        sampled = positions and len(shape) > 2 and positions < s
        keep_p = np.sort(rng.choice(s, positions, replace=False)) if sampled else None
        out[name] = {"units": keep_u, "positions": keep_p}
    return out


def sample_preacts(z: jax.Array, index: Mapping[str, np.ndarray | None]) -> jax.Array:
    """``z [P, positions..., U]`` at the kept positions (flattened: ``[P, m, k]``) and units."""
    if index["positions"] is not None:
        z = jnp.take(z.reshape(z.shape[0], -1, z.shape[-1]), index["positions"], axis=1)
    if index["units"] is not None:
        z = jnp.take(z, index["units"], axis=-1)
    return z


def flip_standard_errors(
    prev: Patterns, cur: Patterns, fractions: Mapping[str, tuple[float, float]]
) -> dict[str, jax.Array]:
    """``flip_se/<layer>`` and ``flip_se/all``: the standard error of a sampled flip rate.

    The estimator: a layer's sampled bits form a crossed sample of ``k`` units and ``m``
    positions (every probe example kept). With ``r_u`` the flip rate of sampled unit ``u``
    (over its sampled positions and all examples) and ``r_p`` that of sampled position ``p``,
    ``se^2 = (1 - k/U) var(r_u) / k + (1 - m/S) var(r_p) / m`` (sample variances, ddof 1;
    ``1 - k/U``, ``1 - m/S`` the finite-population corrections, 0 for a dimension kept
    whole). For a two-way random-effects model this over-counts the interaction term once,
    so it errs on the side of a wider interval. ``flip_se/all`` pools the layers as
    ``flip/all`` does (sampled bits): ``sqrt(sum_l (b_l / B)^2 se_l^2)``.

    Args:
      fractions: ``{layer: (k / U, m / S)}``, the kept fraction of units and of positions.
    """
    out, parts, total = {}, [], sum(p.num_bits for p in cur.values())
    for name, p in cur.items():
        d = jnp.bitwise_xor(prev[name].bits, p.bits)
        flips = bitmask.unpack(d, p.units).astype(jnp.float32)
        flips = flips.reshape(flips.shape[0], -1, flips.shape[-1])  # [P, m, k]
        terms = []
        for axis, frac in ((1, fractions[name][0]), (0, fractions[name][1])):
            rates = jnp.mean(flips, axis=(0, 2 - axis))  # per unit (axis 1) / position (0)
            n = rates.shape[0]
            var = jnp.var(rates, ddof=1) if n > 1 else jnp.zeros((), jnp.float32)
            terms.append((1.0 - frac) * var / n)
        out[f"flip_se/{name}"] = jnp.sqrt(sum(terms))
        parts.append((p.num_bits / total) ** 2 * sum(terms))
    out["flip_se/all"] = jnp.sqrt(sum(parts))
    return out


# ----------------------------------------------------------------------------- the monitor


class MonitorState(NamedTuple):
    """What :func:`pattern_monitor` carries between updates (a pytree; donate it freely).

    Attributes:
      masks: packed patterns ``{layer: Packed}`` of the probe set at the last pattern update
        (1 bit per unit per probe example and position).
      sq_norms: ``{part: ||theta||_2^2}`` of the trained parameters at the last update (the
        denominators of the next ``step/rel/*``): of ``params`` at ``init``, of the part of the
        variables the updates cover at ``update`` (:func:`trained_part`).
    """

    masks: dict[str, Packed]
    sq_norms: dict[str, jax.Array]


class PatternMonitor(NamedTuple):
    """An optax-style pure pair; see :func:`pattern_monitor`."""

    init: Callable[..., MonitorState]
    update: Callable[..., tuple[dict[str, jax.Array], MonitorState]]


def pattern_monitor(
    preacts_fn: Callable[..., tuple[Any, Mapping[str, jax.Array]]],
    probe_x: Any,
    *,
    sites: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    probe_chunk: int | str | None = "auto",
    sample_units: int | None = None,
    sample_positions: int | None = None,
    sample_seed: int = 0,
    **kwargs: Any,
) -> PatternMonitor:
    """Flip rates, dead / always-on fractions and step sizes of any model, as ``init, update``.

    The monitor measures the model as it is at each call: ``variables`` are whatever
    ``preacts_fn`` takes, with the model's non-parameter state as it is now (linen
    ``{"params": ..., "batch_stats": ...}``, an NNX module's full ``nnx.state``), and step sizes
    are of the trained parameters only (the part of ``variables`` the updates cover).

    Args:
      preacts_fn: ``preacts_fn(variables, x, **kwargs) -> (out, {layer: z})``, from
        :func:`regime_jax.capture_relus` (any model) or a built-in model's recording site.
      probe_x: the fixed probe inputs ``[P, ...]`` (P >= 1), e.g. validation examples.
      sites: the layers to measure, by name (``preacts_fn.sites(params, x)`` lists them; a
        scanned layer's name without ``[i]`` selects every iteration); None: all.
      exclude: layers to leave out, by name (same rule).
      probe_chunk: run the probe forward ``N`` examples at a time (``lax.fori_loop`` over
        chunks, masks packed per chunk), so monitoring needs the masks plus one chunk's
        activations whatever ``P`` is, with the same bits (:func:`chunked_patterns`; the
        forward must treat examples independently, as an eval-mode forward does).
        ``"auto"`` (default): chunks whose pre-activations stay within
        :data:`PROBE_CHUNK_BYTES` (64 MiB), one pass when the whole probe set's do; an int
        ``N >= 1``: at most ``N`` per chunk; None: always one pass.
      sample_units, sample_positions, sample_seed: record only a fixed random subset of
        each layer, for models whose full patterns are too large: ``sample_units`` units and
        ``sample_positions`` (flattened) positions per layer (None: all), picked once by
        :func:`sample_indices` from the seed and the layer's name. The masks, flips and
        dead / always-on counts are then those of the sample, and the metrics add
        ``flip_se/<layer>`` and ``flip_se/all`` (:func:`flip_standard_errors`); the indices
        are ``monitor.update.sample(variables)`` (the built-in loop writes them to
        ``sample.json``). Default: everything, no ``flip_se``.
      **kwargs: passed to every ``preacts_fn`` call: a linen model's eval-mode flag
        (``train=False``), so the probe forward is deterministic and reads the running
        statistics (``rj.nnx_apply``'s function runs eval mode already).

    Returns:
      ``PatternMonitor(init, update)``, both pure and jit-able, with no host sync:
        ``init(variables, params=None) -> MonitorState``: the probe patterns at ``variables``
        (step 0). ``params``: the part of ``variables`` the optimizer trains (what you pass
        ``tx.init``: linen ``variables["params"]``, NNX ``nnx.state(model, nnx.Param)``); its
        norms are the next relative step's denominators. Default: all of ``variables`` (the
        plain case, params are the variables).
        ``update(state, variables, updates, *, patterns=True, probe_x=None) -> (metrics,
        state)``: call after the optimizer update with the *new* variables (params and
        non-parameter state) and the updates ``theta_t - theta_{t-1}`` (optax's ``updates``,
        ``nnx.Optimizer.update``'s return value) of the trained parameters: the part of
        ``variables`` at the updates' tree paths, possibly under one prefix such as
        ``params`` (:func:`trained_part`). ``metrics`` has the keys of ``metrics.jsonl``:
        ``step/abs/<part>``, ``step/abs/all``, ``step/rel/<part>``, ``step/rel/all`` always;
        with ``patterns=True`` (a static Python bool) also ``flip/<layer>``, ``flip/all``
        (against the patterns in ``state``), ``dead/<layer>`` and ``always_on/<layer>``.
        ``patterns=False`` skips the probe forward and carries the old patterns. ``probe_x``
        overrides the probe inputs (same shape), e.g. to pass them as a jit argument or
        sharded.

    Raises:
      ValueError: at ``init``, for an empty ``probe_x``, a ``probe_x`` that ``preacts_fn``
        cannot take, no ReLU, or a pre-activation whose leading axis is not the probe axis;
        :class:`StateError` (a ValueError) when the model cannot run on ``variables`` for
        another reason, naming it: a params-only tree where the full variables are needed,
        a missing collection (``batch_stats``), an RNG drawn or state updated on the probe
        forward (pass the eval-mode flag), state mutated outside the traced call (NNX: use
        ``rj.nnx_apply``). At ``update``, updates that do not match a part of ``variables``.

    >>> import jax, jax.numpy as jnp, optax
    >>> from regime_jax.capture import capture_relus
    >>> apply_fn = lambda p, x: jnp.maximum(x @ p["w"], 0.0).sum(-1)
    >>> params, x = {"w": jnp.ones((3, 4))}, jnp.arange(6.0).reshape(2, 3) - 2
    >>> monitor = pattern_monitor(capture_relus(apply_fn), x)
    >>> state = monitor.init(params)
    >>> updates = {"w": -0.1 * jnp.ones((3, 4))}
    >>> metrics, state = monitor.update(state, optax.apply_updates(params, updates), updates)
    >>> round(float(metrics["step/abs/all"]), 4), float(metrics["flip/all"])
    (0.3464, 0.0)
    """
    default_x = probe_x
    pick = _site_picker(sites, exclude)
    probe_chunk_size(1, 1, probe_chunk)  # a bad value is refused here, not at the first update
    for field, value in (("sample_units", sample_units), ("sample_positions", sample_positions)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{field}={value!r}; allowed values: None (all) or an int >= 1")
    sampling = sample_units is not None or sample_positions is not None

    def sample_of(variables: Any, x: Any) -> dict[str, dict[str, np.ndarray | None]]:
        """The kept indices of every layer (static: from shapes, the seed and the names)."""
        z = pick(jax.eval_shape(lambda v, e: preacts_fn(v, e, **kwargs)[1], variables, x))
        shapes = {k: a.shape for k, a in z.items()}
        return sample_indices(shapes, sample_units, sample_positions, sample_seed)

    def fractions(variables: Any, x: Any) -> dict[str, tuple[float, float]]:
        z = pick(jax.eval_shape(lambda v, e: preacts_fn(v, e, **kwargs)[1], variables, x))
        out = {}
        for name, idx in sample_of(variables, x).items():
            u, s = z[name].shape[-1], int(np.prod(z[name].shape[1:-1], dtype=np.int64))
            fu = 1.0 if idx["units"] is None else len(idx["units"]) / u
            fp = 1.0 if idx["positions"] is None else len(idx["positions"]) / max(s, 1)
            out[name] = (fu, fp)
        return out

    def one_pass(variables: Any, x: Any, index: Mapping | None = None) -> dict[str, Packed]:
        try:
            preacts = preacts_fn(variables, x, **kwargs)[1]
        except Exception as err:  # a cause that is not the probe is named; others as raised
            cause = _state_cause(err, variables, kwargs)
            if cause is None:
                raise
            raise cause from err
        preacts = pick(preacts)
        if index is not None:
            preacts = {k: sample_preacts(z, index[k]) for k, z in preacts.items()}
        return patterns_from_preacts(preacts)

    def probe_patterns(variables: Any, x: Any) -> dict[str, Packed]:
        num = jax.tree.leaves(x)[0].shape[0]
        index = sample_of(variables, x) if sampling else None
        if probe_chunk is None or (isinstance(probe_chunk, int) and probe_chunk >= num):
            return one_pass(variables, x, index)
        example = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype), x)
        z = pick(jax.eval_shape(lambda v, e: preacts_fn(v, e, **kwargs)[1], variables, example))
        per_example = sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in z.values())
        chunk = probe_chunk_size(per_example, num, probe_chunk)
        return chunked_patterns(lambda xc: one_pass(variables, xc, index), x, chunk)

    def init(variables: Any, params: Any = None) -> MonitorState:
        _check_probe(preacts_fn, variables, default_x, kwargs)
        pick(jax.eval_shape(lambda v, x: preacts_fn(v, x, **kwargs)[1], variables, default_x))
        trained = variables if params is None else trained_part(variables, params)
        return MonitorState(probe_patterns(variables, default_x), squared_norms(trained))

    def update(
        state: MonitorState,
        variables: Any,
        updates: Any,
        *,
        patterns: bool = True,
        probe_x: Any = None,
    ) -> tuple[dict[str, jax.Array], MonitorState]:
        trained = trained_part(variables, updates)
        metrics = step_sizes_from_norms(updates, state.sq_norms)
        masks = state.masks
        if patterns:
            x = default_x if probe_x is None else probe_x
            masks = probe_patterns(variables, x)
            metrics.update(pattern_metrics(state.masks, masks))
            if sampling:
                metrics.update(flip_standard_errors(state.masks, masks, fractions(variables, x)))
        return metrics, MonitorState(masks, squared_norms(trained))

    update.sample = lambda variables: sample_of(variables, default_x)
    return PatternMonitor(init, update)


def _site_picker(sites: Sequence[str] | None, exclude: Sequence[str]):
    """``pick(preacts)``: the layers ``sites=`` / ``exclude=`` select (unknown names refused)."""
    if isinstance(sites, str) or isinstance(exclude, str):
        raise TypeError("sites= and exclude= take a list of layer names, not a string")
    if sites is None and not exclude:
        return lambda preacts: preacts

    def matches(name: str, wanted: Sequence[str]) -> bool:
        return name in wanted or name.split("[", 1)[0] in wanted

    def pick(preacts: Mapping[str, Any]) -> dict[str, Any]:
        known = {n for k in preacts for n in (k, k.split("[", 1)[0])}
        for field, names in (("sites", sites or ()), ("exclude", exclude)):
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(
                    f"pattern_monitor {field}={unknown}: no such layer; the layers are "
                    f"{', '.join(repr(k) for k in preacts)}"
                )
        out = {
            k: z
            for k, z in preacts.items()
            if (sites is None or matches(k, sites)) and not matches(k, exclude)
        }
        if not out:
            raise ValueError(f"pattern_monitor sites={sites}, exclude={list(exclude)}: no layer")
        return out

    return pick


class StateError(ValueError):
    """The model cannot run on the variables it was given, for a reason other than the input.

    A params-only tree where the model needs its full variables, a collection it reads that
    is missing, an RNG drawn or a collection updated on what should be an eval-mode forward,
    state mutated outside the traced call. The message names the cause and what to pass.
    """


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return re.sub(r"\s*\(https?://\S+\)\s*$", "", line)  # flax appends its docs URL


def _top_entries(variables: Any) -> list[str]:
    return sorted(map(str, variables)) if isinstance(variables, Mapping) else []


def _state_cause(err: BaseException, variables: Any, kwargs: Mapping[str, Any]) -> Exception | None:
    """A one-line error naming why the model cannot run on ``variables``, or None (the input)."""
    if isinstance(err, StateError):
        return err
    kind, line = type(err).__name__, _first_line(err)
    quoted = re.search(r'collection "([^"]+)"', line)
    coll = quoted.group(1) if quoted else None
    flag = f" (it was called with {dict(kwargs)})" if kwargs else ""
    if kind == "TraceContextError" or "from a different trace level" in line:
        return StateError(
            f"the model mutates state it holds outside the traced call ({line}): an NNX "
            f"module's RNG count or BatchNorm statistics closed over by the apply function; "
            f"pass the state as an argument: apply_fn, state = rj.nnx_apply(module) (which "
            f"runs eval mode), then preacts_fn(state, x)"
        )
    if kind == "InvalidRngError" or "needs PRNG" in line:
        stream = re.search(r'PRNG for "([^"]+)"', line)
        name = repr(stream.group(1)) if stream else "an"
        return StateError(
            f"the model draws {name} RNG on the probe forward{flag} ({line}): the probe "
            f"forward must be deterministic; pass the model's eval-mode flag to the monitor, "
            f"e.g. pattern_monitor(preacts_fn, probe_x, train=False)"
        )
    if kind == "ModifyScopeVariableError":
        return StateError(
            f"the model updates its {coll!r} collection on the probe forward{flag} ({line}): "
            f"pass the model's eval-mode flag to the monitor, e.g. "
            f"pattern_monitor(preacts_fn, probe_x, train=False), so it reads the running "
            f"statistics"
        )
    if kind in ("ScopeCollectionNotFound", "ScopeVariableNotFoundError") or (
        "could not find collection" in line.lower()
    ):
        tops = _top_entries(variables)
        if coll == "params":
            return StateError(
                f"the variables have no 'params' collection (top-level entries {tops}): a "
                f"params-only tree; pass the full variables {{'params': params, ...}}, as "
                f"model.init returns them ({line})"
            )
        return StateError(
            f"the model reads collection {coll!r} but the variables hold only {tops}: pass the "
            f"full variables {{'params': params, {coll!r}: ...}} (model.init's output, updated "
            f"by apply(..., mutable=[{coll!r}])), not the params alone ({line})"
        )
    return None


def _check_finite(probe_x: Any) -> None:
    """A NaN or inf probe input would read as "off" bits: refused, naming the first example.

    Checked where the probe is a concrete array (a traced one, inside jit, cannot be read)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(probe_x):
        if isinstance(leaf, jax.core.Tracer) or not jnp.issubdtype(leaf.dtype, jnp.inexact):
            continue
        bad = ~np.isfinite(np.asarray(leaf, np.float32)).reshape(len(leaf), -1).all(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            what = np.asarray(leaf, np.float32).reshape(len(leaf), -1)[i]
            kind = "nan" if np.isnan(what).any() else "inf"
            where = f"probe_x{jax.tree_util.keystr(path)}" if path else "probe_x"
            raise ValueError(
                f"{where} holds {kind} in probe example {i} ({int(bad.sum())} of {len(leaf)} "
                f"examples are not finite): a non-finite input gives no activation pattern"
            )


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
    _check_finite(probe_x)
    shape = shapes[0] if len(shapes) == 1 else (shapes[0][0], "...")
    try:
        _, preacts = jax.eval_shape(lambda p, x: preacts_fn(p, x, **kwargs), params, probe_x)
    except CaptureError:
        raise
    except Exception as err:  # whatever the model raises for inputs it cannot take
        cause = _state_cause(err, params, kwargs)
        if cause is not None:
            raise cause from err
        raise ValueError(
            f"probe_x with shape {tuple(shape)} cannot be passed to the model: {_first_line(err)}"
        ) from err
    if not preacts:
        raise ValueError("the model records no ReLU pre-activation: nothing to monitor")
    for name, z in preacts.items():
        if len(z.shape) < 2 or z.shape[0] != shape[0]:
            raise ValueError(
                f"layer {name!r} has pre-activations of shape {tuple(z.shape)}; expected "
                f"[P={shape[0]}, ..., units] with the probe examples on the leading axis"
            )
