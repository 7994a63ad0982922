"""Breaking radii of activation patterns along directions in parameter space.

The geometry behind :mod:`regime_jax.stability`: random unit directions in the flattened
parameter space (global or one top-level params subtree at a time), the first-order radius
``min_i |z_i| / |J_i u|`` over the units moving towards zero (``jax.jvp``), the empirical
breaking radius on a grid of radii (``jax.vmap`` over directions and radii, radii batched
through ``jax.lax.map``), and censored quantiles of breaking radii. See the stability module's
docstring for the method and its caveats. Shape letters: ``R`` radii, ``V`` directions, ``P``
probe examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from regime_jax import bitmask
from regime_jax.capture import CaptureError, PreactsFn
from regime_jax.models.adapt import as_net, is_model

# ----------------------------------------------------------------------------- directions


def _normal_like(key: jax.Array, params: Any, num: int) -> Any:
    # One flat draw sliced into the leaves: a separate jax.random.normal per leaf costs
    # about a second of XLA compile time per leaf on CPU.
    leaves, treedef = jax.tree.flatten(params)
    dtypes = [jnp.asarray(leaf).dtype for leaf in leaves]
    for dt in dtypes:
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(f"params leaves must be floating point, got {dt}")
    sizes = [int(np.prod(jnp.shape(leaf))) for leaf in leaves]
    # float32 draw (cast per leaf, normalised later in the leaf dtype): the float64 normal
    # sampler's erf_inv expansion multiplies the XLA compile time of the stability test.
    flat = jax.random.normal(key, (num, sum(sizes)), jnp.float32)
    flat = jax.lax.optimization_barrier(flat)  # keep XLA from re-fusing the RNG into each slice
    offsets = np.cumsum([0, *sizes])
    noise = [
        flat[:, lo:hi].reshape(num, *jnp.shape(leaf)).astype(dt)
        for lo, hi, leaf, dt in zip(offsets[:-1], offsets[1:], leaves, dtypes, strict=True)
    ]
    return jax.tree.unflatten(treedef, noise)


def _unit_normalise(tree: Any) -> Any:
    leaves = jax.tree.leaves(tree)
    sq = sum(jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1) for g in leaves)
    inv = jax.lax.rsqrt(sq)
    return jax.tree.map(
        lambda g: g * inv.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), tree
    )


def random_directions(key: jax.Array, params: Any, num: int) -> Any:
    """Unit-norm Gaussian directions in the full flattened parameter space.

    Args:
      key: PRNG key.
      params: the params pytree (floating leaves), e.g. ``variables["params"]``.
      num: number of directions ``V``.

    Returns:
      A params-shaped pytree whose leaves are ``[V, *leaf.shape]`` (leaf dtype); for each
      ``d`` the global norm over all leaves of ``tree[d]`` is 1.

    >>> u = random_directions(jax.random.key(0), {"w": jnp.ones((3, 2))}, 4)
    >>> u["w"].shape
    (4, 3, 2)
    """
    return _unit_normalise(_normal_like(key, params, num))


def param_layers(params: Any) -> tuple[str, ...]:
    """Top-level params subtree keys in sorted (pytree) order: ``("fc1", "fc2", "head")``."""
    if not isinstance(params, Mapping) or not params:
        raise ValueError("per-layer directions need params to be a non-empty dict of subtrees")
    return tuple(sorted(params))


def random_layer_directions(key: jax.Array, params: Any, num: int) -> Any:
    """Unit-norm Gaussian directions supported on one top-level params subtree at a time.

    Args:
      key: PRNG key.
      params: dict of subtrees (``{"fc1": ..., "head": ...}``).
      num: directions per subtree.

    Returns:
      A params-shaped pytree with leaves ``[L * num, *leaf.shape]``; direction
      ``l * num + j`` is zero outside subtree ``param_layers(params)[l]`` and has unit norm.

    >>> u = random_layer_directions(jax.random.key(0), {"a": jnp.ones(2), "b": jnp.ones(3)}, 2)
    >>> u["a"].shape, float(jnp.abs(u["b"][:2]).sum())
    ((4, 2), 0.0)
    """
    layers = param_layers(params)
    noise = _normal_like(key, params, len(layers) * num)
    owner = np.repeat(np.arange(len(layers)), num)  # direction d lives in layers[owner[d]]

    def restrict(path: tuple[Any, ...], g: jax.Array) -> jax.Array:
        keep = jnp.asarray(owner == layers.index(_key_name(path[0])), g.dtype)
        return g * keep.reshape((-1,) + (1,) * (g.ndim - 1))

    return _unit_normalise(jax.tree_util.tree_map_with_path(restrict, noise))


def _key_name(entry: Any) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


# ----------------------------------------------------------------------------- analytic


def first_order_radius(
    preacts_fn: PreactsFn, params: Any, x: jax.Array, u: Any, two_sided: bool = False
) -> jax.Array:
    """First-order radius along ``u`` at which the first unit's bit flips, per example.

    ``min_i |z_i| / |J_i u|`` over the units ``i`` (all layers and positions) that move towards
    flipping for ``eps > 0`` (``z_i > 0, J_i u < 0`` or ``z_i <= 0, J_i u > 0``); ``J_i u`` is
    the directional derivative from ``jax.jvp`` of ``params -> preacts_fn(params, x)[1]``.
    Units with ``J_i u == 0`` (or moving away from zero) are ignored; ``inf`` if none is left.
    ``two_sided=True`` keeps every unit with ``J_i u != 0`` (either sign of ``eps``).

    Args:
      preacts_fn: ``preacts_fn(params, x) -> (out, {layer: z})`` (see the module docstring).
      params: params pytree.
      x: probe inputs ``[P, ...]``.
      u: one direction, params-shaped (no leading axis).
      two_sided: see above.

    Returns:
      ``[P]`` radii, ``>= 0`` (``0`` exactly when a unit sits at ``z == 0`` and ``u`` turns
      it on), ``inf`` when no unit moves towards zero.

    >>> from regime_jax.models import create_model
    >>> model = create_model({"name": "mlp", "hidden": [8]}, 3)
    >>> x = jax.random.normal(jax.random.key(0), (5, 4))
    >>> params = model.init(jax.random.key(1), x)["params"]
    >>> u = jax.tree.map(lambda d: d[0], random_directions(jax.random.key(2), params, 1))
    >>> first_order_radius(model, params, x, u).shape
    (5,)
    """
    preacts_fn = as_preacts_fn(preacts_fn)
    z, dz = jax.jvp(lambda p: _forward(preacts_fn, p, x)[1], (params,), (u,))
    out = jnp.full((x.shape[0],), jnp.inf, dtype_of(params))
    for name in z:
        zl, dl = z[name], dz[name]
        if two_sided:
            moving = dl != 0
        else:
            moving = ((zl > 0) & (dl < 0)) | ((zl <= 0) & (dl > 0))
        rad = jnp.where(moving, jnp.abs(zl) / jnp.where(moving, jnp.abs(dl), 1), jnp.inf)
        out = jnp.minimum(out, jnp.min(rad.reshape(rad.shape[0], -1), axis=1).astype(out.dtype))
    return out


# ----------------------------------------------------------------------------- empirical


def dtype_of(params: Any):
    leaves = jax.tree.leaves(params)
    return jnp.result_type(*leaves) if leaves else jnp.result_type(float)


def as_preacts_fn(preacts_fn: Any) -> PreactsFn:
    """A linen / NNX module or a ``models.Net`` is read through capture_relus; a function as is."""
    return as_net(preacts_fn).preacts_fn if is_model(preacts_fn) else preacts_fn


def _forward(preacts_fn: PreactsFn, params: Any, x: jax.Array):
    out, preacts = preacts_fn(params, x)
    if not preacts:
        raise CaptureError("the model has no ReLU pre-activation: there is no pattern to test")
    return out, preacts


def sweep_radii(preacts_fn, params, x, dirs, radii, radius_batch):
    """Perturbed forwards for every (radius, direction): the one expensive step.

    Returns (changed ``{layer: [R, V, P] bool}``, flips ``{layer: [R, V] Count}`` (int32,
    or uint32 ``[R, V, 2]`` limbs for a layer of 2^31 bits or more, :mod:`regime_jax.bitmask`),
    output change ``[R, V, P]``, bits per layer ``{layer: int}``).
    """
    logits0, z0 = _forward(preacts_fn, params, x)
    bits0 = {k: bitmask.active(v) for k, v in z0.items()}

    def per_direction(eps, u):
        p = jax.tree.map(lambda a, b: a + eps.astype(a.dtype) * b, params, u)
        logits, z = _forward(preacts_fn, p, x)
        changed, flips = {}, {}
        for name, zl in z.items():
            diff = bitmask.active(zl) != bits0[name]
            changed[name] = jnp.any(diff.reshape(diff.shape[0], -1), axis=1)
            flips[name] = bitmask.count_sum(diff, 1, diff.size)  # exact past 2^31 bits
        sq = [
            jnp.sum(jnp.square(a - b).reshape(a.shape[0], -1), axis=1)
            for a, b in zip(jax.tree.leaves(logits), jax.tree.leaves(logits0), strict=True)
        ]
        return changed, flips, jnp.sqrt(sum(sq))

    def per_radius(eps):
        return jax.vmap(per_direction, in_axes=(None, 0))(eps, dirs)

    if radius_batch is None or radius_batch >= radii.shape[0]:
        changed, flips, out = jax.vmap(per_radius)(radii)
    else:
        changed, flips, out = jax.lax.map(per_radius, radii, batch_size=radius_batch)
    return changed, flips, out, {k: int(np.prod(v.shape)) for k, v in z0.items()}


def any_layer(changed: Mapping[str, jax.Array], shape) -> jax.Array:
    acc = jnp.zeros(shape, bool)
    for v in changed.values():
        acc = acc | v
    return acc


def first_break(changed_RxVxP: jax.Array, radii: jax.Array):
    """First radius with a change (inf if none) and the tested radius below it (bracket)."""
    hit = jnp.any(changed_RxVxP, axis=0)
    idx = jnp.argmax(changed_RxVxP, axis=0)
    upper = jnp.where(hit, radii[idx], jnp.inf)
    below = jnp.where(idx > 0, radii[jnp.maximum(idx - 1, 0)], 0)
    lower = jnp.where(hit, below, radii[-1])
    return upper, lower


def empirical_breaking_radius(
    preacts_fn: PreactsFn,
    params: Any,
    x: jax.Array,
    u: Any,
    radii: Sequence[float] | jax.Array,
    radius_batch: int | None = None,
) -> jax.Array:
    """Smallest tested radius at which ``theta + eps * u`` changes each example's pattern.

    Args:
      preacts_fn, params: as in :func:`perturb`.
      x: probe inputs ``[P, ...]``.
      u: one direction, params-shaped (no leading axis).
      radii: increasing tested radii ``[R]``.
      radius_batch: radii evaluated together (``None``: all).

    Returns:
      ``[P]``: the first ``radii[k]`` at which any unit of the example flips (``inf`` if none).
      The crossing lies in ``(radii[k-1], radii[k]]`` unless it flipped back in between.

    >>> from regime_jax.models import create_model
    >>> model = create_model({"name": "mlp", "hidden": [8]}, 3)
    >>> x = jax.random.normal(jax.random.key(0), (5, 4))
    >>> params = model.init(jax.random.key(1), x)["params"]
    >>> u = jax.tree.map(lambda d: d[0], random_directions(jax.random.key(2), params, 1))
    >>> empirical_breaking_radius(model, params, x, u, np.geomspace(1e-4, 1, 40)).shape
    (5,)
    """
    radii = jnp.asarray(radii, dtype_of(params))
    dirs = jax.tree.map(lambda a: a[None], u)
    preacts_fn = as_preacts_fn(preacts_fn)
    changed, _, _, _ = sweep_radii(preacts_fn, params, x, dirs, radii, radius_batch)
    upper, _ = first_break(any_layer(changed, (radii.shape[0], 1, x.shape[0])), radii)
    return upper[0]


# ----------------------------------------------------------------------------- summaries


def _qkey(q: float) -> str:
    pct = q * 100
    return f"q{round(pct)}" if abs(pct - round(pct)) < 1e-9 else f"q{pct:g}"


def radius_quantiles(
    breaking_radius: jax.Array, qs: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9)
) -> dict[str, jax.Array]:
    """Quantiles of an empirical stability-radius sample that may contain ``inf`` (unbroken).

    ``inf`` means "did not break within the tested radii": a right-censored value, larger than
    anything tested. ``q<k>`` is the quantile over all values with ``inf`` sorted last, so it
    is ``inf`` exactly when it reaches into the unbroken part (the quantile lies beyond the
    largest tested radius; finite values are unaffected by how many are censored above them);
    ``finite_q<k>`` is over the finite values only (nan if none), biased low when many are
    censored. Linear interpolation between neighbouring order statistics (numpy's default).

    Args:
      breaking_radius: radii of any shape (flattened), ``>= 0`` or ``inf``.
      qs: quantile levels in [0, 1].

    Returns:
      ``{"q10": ..., "finite_q10": ..., ..., "num_inf": int32, "frac_inf": float}`` scalars.

    >>> radius_quantiles(jnp.array([1.0, 2.0, jnp.inf]), qs=(0.5,))["q50"]
    Array(2., dtype=float32)
    """
    r = jnp.ravel(breaking_radius)
    n = r.shape[0]
    inf = ~jnp.isfinite(r)
    num_inf = jnp.sum(inf, dtype=jnp.int32)
    s = jnp.sort(r)
    s_fin = jnp.sort(jnp.where(inf, jnp.nan, r))  # nan sorts last
    n_fin = n - num_inf
    out: dict[str, jax.Array] = {"num_inf": num_inf, "frac_inf": num_inf / max(n, 1)}
    for q in qs:
        if not 0 <= q <= 1:
            raise ValueError(f"quantile level {q!r} invalid; allowed values: floats in [0, 1]")
        out[_qkey(q)] = _interp(s, jnp.asarray(q * (n - 1)))
        pos = q * jnp.maximum(n_fin - 1, 0)
        out[f"finite_{_qkey(q)}"] = jnp.where(n_fin > 0, _interp(s_fin, pos), jnp.nan)
    return out


def _interp(s: jax.Array, pos: jax.Array) -> jax.Array:
    if s.shape[0] == 0:
        return jnp.asarray(jnp.nan, s.dtype)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, s.shape[0] - 1)
    frac = (pos - lo).astype(s.dtype)
    v_lo, v_hi = s[lo], s[hi]
    censored = jnp.isinf(v_lo) | (jnp.isinf(v_hi) & (frac > 0))
    step = jnp.where(jnp.isfinite(v_hi), v_hi - v_lo, 0)
    return jnp.where(censored, jnp.inf, v_lo + step * frac)
