"""Finite-difference probe of the local stability of ReLU activation patterns.

Local-stability theorem: outside measure-zero sets of parameters ``theta`` and inputs ``x``
there is ``r(x, theta) > 0`` such that every perturbation ``||delta|| < r`` keeps the
activation pattern, ``A(x; theta + delta) == A(x; theta)``. The margin intuition: ``r`` is
about ``min_i |z_i| / ||dz_i / dtheta||`` over the units ``i`` (all layers, all positions).

Method. Draw ``D`` random unit directions ``u`` in the flattened parameter space (Gaussian,
normalised by the global norm over all leaves; or, with ``per_layer``, supported on one
top-level params subtree at a time), evaluate the model at ``theta + eps * u`` for every
tested radius ``eps`` (``jax.vmap`` over directions and radii, radii in batches of
``radius_batch`` through ``jax.lax.map``: one compiled computation), and compare the patterns
``z > 0`` (exact zero is off: :func:`regime_jax.bitmask.active`, the same bit the training
step records) with those at ``theta``. The model enters as ``preacts_fn(params, x) -> (out,
{layer: z})``: :func:`regime_jax.capture_relus` of any function, a built-in model's site
(``models.site_preacts_fn``), or a linen / NNX module (read through ``capture_relus``).
Only ``+eps`` is tested; Gaussian directions are symmetric, so ``-u`` is as
likely as ``u``. Cost: ``D x len(fine_radii)`` forward passes on the probe batch plus ``D``
JVPs; peak memory about ``radius_batch x D`` copies of the params and of the activations.

Analytic cross-check. Along ``u`` the pre-activation moves, to first order, as
``z_i + eps * J_i u`` (``J_i u`` from ``jax.jvp``), so unit ``i`` crosses zero at
``eps_i = |z_i| / |J_i u|`` *if it moves towards zero*: ``z_i > 0`` and ``J_i u < 0``
(turns off), or ``z_i <= 0`` and ``J_i u > 0`` (turns on; with ``z_i == 0`` this is
``eps_i = 0``). :func:`first_order_radius` is the minimum over such units. It is the
one-sided (``+eps``) version of ``min_i |z_i| / |J_i u|`` so it can be compared with the
probe; ``two_sided=True`` gives the symmetric ``min_i |z_i| / |J_i u|`` (the radius on the
line ``theta + eps u``, ``eps`` of either sign). As the radius goes to zero the empirical
breaking radius along ``u`` agrees with it (ratio -> 1 on a fine grid).

Caveats.
  * Measure zero: the theorem excludes a null set. On it (e.g. a unit with ``z == 0``
    exactly: zero biases meeting a zero input row, or a layer whose inputs are all dead
    meeting a zero bias) a pattern can break at *every* ``eps > 0``; the probe reports this
    as breaking at the smallest tested radius and :func:`first_order_radius` as ``0``.
    Default linen init (zero biases) puts models on such a set for some inputs.
  * Grid: the empirical radius is known only to the bracket ``(lower, upper]`` of
    consecutive tested radii, and a flip-and-flip-back between two grid points is not
    seen. The default grid (``refine=0``) is coarse (x3.5 per step); use ``refine`` for the
    fine grid the first-order cross-check needs (``refine=24`` on 1e-4..1e-1: x1.1 per step).
  * Precision: in float32 a step ``eps * u_j`` below ~1e-7 relative to ``theta_j`` is lost to
    rounding; with ``~1e5`` parameters ``|u_j| ~ 3e-3``, so radii below ~1e-4 mostly test
    rounding. Use float64 (``jax.enable_x64``) to probe tiny radii.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from regime_jax import bitmask
from regime_jax.capture import CaptureError, PreactsFn
from regime_jax.models.adapt import as_net, is_model

ALL = "all"  # key of the every-layer-together summaries


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """Static probe settings (frozen and hashable: usable as a static ``jax.jit`` argument).

    The coarse radius grid is ``np.geomspace(min_radius, max_radius, num_radii)`` (default:
    12 values, 1e-6 .. 1). The fine grid inserts ``refine`` log-spaced radii between each pair
    of consecutive coarse radii (the coarse radii are kept exactly); every forward pass runs on
    the fine grid, the per-radius summaries are reported on the coarse grid and the breaking
    radii on the fine grid.

    Attributes:
      num_directions: random directions (per layer, if ``per_layer``); >= 1.
      min_radius: smallest tested radius; finite, > 0.
      max_radius: largest tested radius; finite, >= ``min_radius``.
      num_radii: coarse radii; >= 1 (1 means only ``min_radius``).
      refine: extra fine radii between consecutive coarse radii; >= 0.
      per_layer: directions restricted to one top-level params subtree (``fc1``, ``head``,
        ``block0``) at a time, ``num_directions`` for each subtree in sorted key order.
      radius_batch: radii evaluated together (``jax.lax.map(..., batch_size=)``); bounds the
        memory at ``radius_batch x directions`` forward passes. ``None``: all at once.

    >>> ProbeConfig(num_radii=3, max_radius=1e-4).radii.round(9).tolist()
    [1e-06, 1e-05, 0.0001]
    >>> ProbeConfig(num_radii=2, refine=1).fine_radii.round(9).tolist()
    [1e-06, 0.001, 1.0]
    """

    num_directions: int = 16
    min_radius: float = 1e-6
    max_radius: float = 1.0
    num_radii: int = 12
    refine: int = 0
    per_layer: bool = False
    radius_batch: int | None = 4

    def __post_init__(self):
        def need(ok: bool, field: str, allowed: str):
            if not ok:
                value = getattr(self, field)
                raise ValueError(
                    f"ProbeConfig.{field}={value!r} invalid; allowed values: {allowed}"
                )

        def is_int(v: Any) -> bool:
            return isinstance(v, int | np.integer) and not isinstance(v, bool)

        def is_real(v: Any) -> bool:
            return isinstance(v, int | float | np.number) and not isinstance(v, bool)

        need(is_int(self.num_directions) and self.num_directions >= 1, "num_directions", "int >= 1")
        need(
            is_real(self.min_radius) and math.isfinite(self.min_radius) and self.min_radius > 0,
            "min_radius",
            "finite float > 0",
        )
        need(
            is_real(self.max_radius)
            and math.isfinite(self.max_radius)
            and self.max_radius >= self.min_radius,
            "max_radius",
            f"finite float >= min_radius={self.min_radius!r}",
        )
        need(is_int(self.num_radii) and self.num_radii >= 1, "num_radii", "int >= 1")
        need(is_int(self.refine) and self.refine >= 0, "refine", "int >= 0")
        need(isinstance(self.per_layer, bool), "per_layer", "True or False")
        need(
            self.radius_batch is None or (is_int(self.radius_batch) and self.radius_batch >= 1),
            "radius_batch",
            "None or int >= 1",
        )

    @property
    def radii(self) -> np.ndarray:
        """Coarse grid ``[R]`` (float64 numpy), log-spaced from min_radius to max_radius."""
        return np.geomspace(self.min_radius, self.max_radius, self.num_radii)

    @property
    def fine_radii(self) -> np.ndarray:
        """Fine grid ``[(R - 1) * (refine + 1) + 1]``; ``fine_radii[:: refine + 1] == radii``."""
        coarse = self.radii
        steps = np.arange(self.refine + 1) / (self.refine + 1)
        inner = [lo * (hi / lo) ** steps for lo, hi in itertools.pairwise(coarse)]
        return np.concatenate([*inner, coarse[-1:]])


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
    # sampler's erf_inv expansion multiplies the XLA compile time of the probe.
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
      num: number of directions ``D``.

    Returns:
      A params-shaped pytree whose leaves are ``[D, *leaf.shape]`` (leaf dtype); for each
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
    preacts_fn = _as_preacts_fn(preacts_fn)
    z, dz = jax.jvp(lambda p: _forward(preacts_fn, p, x)[1], (params,), (u,))
    out = jnp.full((x.shape[0],), jnp.inf, _dtype_of(params))
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


def _dtype_of(params: Any):
    leaves = jax.tree.leaves(params)
    return jnp.result_type(*leaves) if leaves else jnp.result_type(float)


def _as_preacts_fn(preacts_fn: Any) -> PreactsFn:
    """A linen / NNX module or a ``models.Net`` is read through capture_relus; a function as is."""
    return as_net(preacts_fn).preacts_fn if is_model(preacts_fn) else preacts_fn


def _forward(preacts_fn: PreactsFn, params: Any, x: jax.Array):
    out, preacts = preacts_fn(params, x)
    if not preacts:
        raise CaptureError("the model has no ReLU pre-activation: there is no pattern to probe")
    return out, preacts


def _sweep(preacts_fn, params, x, dirs, radii, radius_batch):
    """Perturbed forwards for every (radius, direction): the one expensive step.

    Returns (changed ``{layer: [R, D, P] bool}``, flips ``{layer: [R, D] int32}``,
    output change ``[R, D, P]``, bits per layer ``{layer: int}``).
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
            flips[name] = jnp.sum(diff, dtype=jnp.int32)
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


def _any_layer(changed: Mapping[str, jax.Array], shape) -> jax.Array:
    acc = jnp.zeros(shape, bool)
    for v in changed.values():
        acc = acc | v
    return acc


def _first_break(changed_RxDxP: jax.Array, radii: jax.Array):
    """First radius with a change (inf if none) and the tested radius below it (bracket)."""
    hit = jnp.any(changed_RxDxP, axis=0)
    idx = jnp.argmax(changed_RxDxP, axis=0)
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
      preacts_fn, params: as in :func:`fd_probe`.
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
    radii = jnp.asarray(radii, _dtype_of(params))
    dirs = jax.tree.map(lambda a: a[None], u)
    preacts_fn = _as_preacts_fn(preacts_fn)
    changed, _, _, _ = _sweep(preacts_fn, params, x, dirs, radii, radius_batch)
    upper, _ = _first_break(_any_layer(changed, (radii.shape[0], 1, x.shape[0])), radii)
    return upper[0]


def fd_probe(
    preacts_fn: PreactsFn,
    params: Any,
    x: jax.Array,
    key: jax.Array,
    config: ProbeConfig = ProbeConfig(),
) -> dict[str, jax.Array]:
    """Finite-difference stability probe of the activation patterns of ``x`` at ``params``.

    Pure; ``jax.jit(fd_probe, static_argnames=("preacts_fn", "config"))`` compiles it into one
    computation. ``D = num_directions`` (``L * num_directions`` with ``per_layer``), ``R`` =
    ``len(config.radii)``, ``F = len(config.fine_radii)``, ``P = x.shape[0]``; "layer" below
    is a recorded ReLU site (``fc1``, ``block0/ffn``), "param layer" a top-level params key.

    Args:
      preacts_fn: ``preacts_fn(params, x) -> (out, {layer: z})``:
        ``regime_jax.capture_relus(apply_fn)`` for any model, or a linen / NNX module.
        ``out`` (logits ``[P, ...]``) gives ``output_change``.
      params: params pytree (what ``preacts_fn`` takes).
      x: probe inputs ``[P, ...]``.
      key: PRNG key for the directions.
      config: :class:`ProbeConfig` (static).

    Returns:
      Flat dict of arrays (float in the params dtype unless noted):
        ``radii [R]``, ``fine_radii [F]``: tested radii.
        ``kept/all [R]``: fraction of (direction, example) pairs whose whole pattern (every
          layer) is unchanged at ``theta + r u``. ``kept/<layer> [R]``: same, that layer only.
        ``flip/all [R]``, ``flip/<layer> [R]``: fraction of bits flipped (examples x positions
          x units), averaged over directions.
        ``output_change [R]``: mean over (direction, example) of ``||f(theta+r u)(x) -
          f(theta)(x)||_2`` over the logits.
        ``breaking_radius [P]``: smallest fine radius at which any direction changes the
          example's pattern (``inf`` if none).
        ``breaking_radius_dir [D, P]``: same per direction (upper end of the bracket);
          ``breaking_radius_dir_lower [D, P]``: tested radius just below it (0 if it broke at
          the first radius; ``fine_radii[-1]`` if it never broke).
        ``first_order_radius [D, P]``: :func:`first_order_radius` per direction.
        ``ratio [D, P]``: ``breaking_radius_dir / first_order_radius`` where both are finite
          and positive, else nan; ``ratio_lower [D, P]``: same with the lower bracket end.
        With ``per_layer``: ``by_param/<param layer>/kept/all [R]``,
          ``.../flip/all [R]``, ``.../output_change [R]`` over that subtree's directions.

    Invariants: kept and flip values lie in [0, 1]; ``kept/all <= kept/<layer>``;
    ``breaking_radius == min_d breaking_radius_dir``; ``breaking_radius_dir_lower <
    breaking_radius_dir``; deterministic in ``key``.

    >>> from regime_jax.models import create_model
    >>> model = create_model({"name": "mlp", "hidden": [8]}, 3)
    >>> x = jax.random.normal(jax.random.key(0), (5, 4))
    >>> params = model.init(jax.random.key(1), x)["params"]
    >>> probe = jax.jit(fd_probe, static_argnames=("preacts_fn", "config"))
    >>> out = probe(model, params, x, jax.random.key(2), ProbeConfig(num_directions=3))
    >>> out["kept/all"].shape, out["kept/fc1"].shape, out["first_order_radius"].shape
    ((12,), (12,), (3, 5))
    """
    dtype = _dtype_of(params)
    preacts_fn = _as_preacts_fn(preacts_fn)
    if config.per_layer:
        dirs = random_layer_directions(key, params, config.num_directions)
    else:
        dirs = random_directions(key, params, config.num_directions)
    num_dirs = jax.tree.leaves(dirs)[0].shape[0]
    fine = jnp.asarray(config.fine_radii, dtype)
    coarse = slice(None, None, config.refine + 1)
    changed, flips, out_change, bits = _sweep(
        preacts_fn, params, x, dirs, fine, config.radius_batch
    )
    shape = (fine.shape[0], num_dirs, x.shape[0])
    changed_all = _any_layer(changed, shape)
    total_bits = sum(bits.values())
    if total_bits == 0:
        raise ValueError(f"no pattern bit to probe: x has shape {tuple(x.shape)}")
    flips_all = sum(flips.values(), jnp.zeros(shape[:2], jnp.int32))

    def summaries(sel, prefix: str = "") -> dict[str, jax.Array]:
        res = {
            f"{prefix}kept/{ALL}": jnp.mean(~changed_all[coarse, sel], axis=(1, 2)).astype(dtype),
            f"{prefix}flip/{ALL}": jnp.mean(flips_all[coarse, sel] / total_bits, axis=1),
            f"{prefix}output_change": jnp.mean(out_change[coarse, sel], axis=(1, 2)),
        }
        return {k: v.astype(dtype) for k, v in res.items()}

    result = {"radii": fine[coarse], "fine_radii": fine, **summaries(slice(None))}
    for name in changed:
        result[f"kept/{name}"] = jnp.mean(~changed[name][coarse], axis=(1, 2)).astype(dtype)
        result[f"flip/{name}"] = jnp.mean(flips[name][coarse] / bits[name], axis=1).astype(dtype)
    if config.per_layer:
        for li, name in enumerate(param_layers(params)):
            sel = slice(li * config.num_directions, (li + 1) * config.num_directions)
            result.update(summaries(sel, f"by_param/{name}/"))

    upper, lower = _first_break(changed_all, fine)
    fo = jax.vmap(lambda u: first_order_radius(preacts_fn, params, x, u))(dirs).astype(dtype)
    ok = jnp.isfinite(upper) & jnp.isfinite(fo) & (fo > 0)
    safe_fo = jnp.where(ok, fo, 1)
    result.update(
        breaking_radius=jnp.min(upper, axis=0),
        breaking_radius_dir=upper,
        breaking_radius_dir_lower=lower,
        first_order_radius=fo,
        ratio=jnp.where(ok, upper / safe_fo, jnp.nan),
        ratio_lower=jnp.where(ok, lower / safe_fo, jnp.nan),
    )
    return result


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


def _radius_labels(radii: np.ndarray) -> list[str]:
    labels = [f"{r:.0e}" for r in radii]
    if len(set(labels)) < len(labels):  # grid finer than one digit: keep the labels distinct
        labels = [f"{r:.2e}" for r in radii]
    return labels


def probe_metrics(
    preacts_fn: PreactsFn,
    params: Any,
    x: jax.Array,
    key: jax.Array,
    config: ProbeConfig = ProbeConfig(),
) -> dict[str, jax.Array]:
    """Flat scalar summary of :func:`fd_probe` for ``metrics.jsonl`` (pure, jit-able).

    Keys (``<r>`` = ``f"{radius:.0e}"``, or ``.2e`` if two coarse radii would share a label):
      ``probe/kept@<r>``, ``probe/flip@<r>``, ``probe/output_change@<r>``;
      ``probe/kept/<layer>@<r>``, ``probe/flip/<layer>@<r>`` per recorded layer;
      ``probe/radius_q{10,25,50,75,90}`` (censored quantiles of ``breaking_radius``, inf when
      beyond the grid), ``probe/radius_frac_inf``;
      ``probe/first_order_q{10,25,50,75,90}`` of the per-example first-order radius (min over
      directions, comparable with ``breaking_radius``);
      ``probe/ratio_q50``, ``probe/ratio_lower_q50``: medians over finite (direction, example)
      pairs of ``ratio`` / ``ratio_lower`` (nan if none); ``probe/first_order_in_bracket``:
      fraction of those pairs whose first-order radius lies in the empirical bracket;
      with ``per_layer``: ``probe/by_param/<param layer>/{kept,flip,output_change}@<r>``.

    >>> from regime_jax.models import create_model
    >>> model = create_model({"name": "mlp", "hidden": [8]}, 3)
    >>> x = jax.random.normal(jax.random.key(0), (5, 4))
    >>> params = model.init(jax.random.key(1), x)["params"]
    >>> metrics = jax.jit(probe_metrics, static_argnames=("preacts_fn", "config"))
    >>> m = metrics(model, params, x, jax.random.key(2), ProbeConfig(num_directions=3))
    >>> float(m["probe/kept@1e-06"]), "probe/radius_q50" in m
    (1.0, True)
    """
    out = fd_probe(preacts_fn, params, x, key, config)
    labels = _radius_labels(config.radii)
    metrics: dict[str, jax.Array] = {}
    for name, value in out.items():
        head, _, tail = name.rpartition("/")
        if name.startswith(("kept/", "flip/", "by_param/")) or name == "output_change":
            base = head if tail == ALL else name  # kept/all -> kept
            for i, lab in enumerate(labels):
                metrics[f"probe/{base}@{lab}"] = value[i]
    for k, v in radius_quantiles(out["breaking_radius"]).items():
        if not k.startswith("finite_") and k != "num_inf":
            metrics[f"probe/radius_{k}"] = v
    first_order = jnp.min(out["first_order_radius"], axis=0)
    for k, v in radius_quantiles(first_order).items():
        if k.startswith("q"):
            metrics[f"probe/first_order_{k}"] = v
    ratio, ratio_lower = out["ratio"], out["ratio_lower"]
    metrics["probe/ratio_q50"] = jnp.nanmedian(ratio)
    metrics["probe/ratio_lower_q50"] = jnp.nanmedian(ratio_lower)
    finite = jnp.isfinite(ratio)
    in_bracket = finite & (ratio_lower <= 1) & (ratio >= 1)
    metrics["probe/first_order_in_bracket"] = jnp.sum(in_bracket) / jnp.maximum(jnp.sum(finite), 1)
    return metrics
