"""Finite-difference test of the local stability of ReLU activation patterns.

Local-stability theorem: outside measure-zero sets of parameters ``theta`` and inputs ``x``
there is ``r(x, theta) > 0`` such that every perturbation ``||delta|| < r`` keeps the
activation pattern, ``A(x; theta + delta) == A(x; theta)``. The margin intuition: ``r`` is
about ``min_i |z_i| / ||dz_i / dtheta||`` over the units ``i`` (all layers, all positions).

Method. Draw ``V`` random unit directions ``u`` in the flattened parameter space (Gaussian,
normalised by the global norm over all leaves; or, with ``per_layer``, supported on one
top-level params subtree at a time), evaluate the model at ``theta + eps * u`` for every
tested radius ``eps`` (``jax.vmap`` over directions and radii, radii in batches of
``radius_batch`` through ``jax.lax.map``: one compiled computation), and compare the patterns
``z > 0`` (exact zero is off: :func:`regime_jax.bitmask.active`, the same bit the training
step records) with those at ``theta``. The model enters as ``preacts_fn(params, x) -> (out,
{layer: z})``: :func:`regime_jax.capture_relus` of any function, a built-in model's site
(``models.site_preacts_fn``), or a linen / NNX module (read through ``capture_relus``).
Only ``+eps`` is tested; Gaussian directions are symmetric, so ``-u`` is as
likely as ``u``. Cost: ``V x len(fine_radii)`` forward passes on the probe batch plus ``V``
JVPs; peak memory about ``radius_batch x V`` copies of the params and of the activations.

Analytic cross-check. Along ``u`` the pre-activation moves, to first order, as
``z_i + eps * J_i u`` (``J_i u`` from ``jax.jvp``), so unit ``i`` crosses zero at
``eps_i = |z_i| / |J_i u|`` *if it moves towards zero*: ``z_i > 0`` and ``J_i u < 0``
(turns off), or ``z_i <= 0`` and ``J_i u > 0`` (turns on; with ``z_i == 0`` this is
``eps_i = 0``). :func:`first_order_radius` is the minimum over such units. It is the
one-sided (``+eps``) version of ``min_i |z_i| / |J_i u|`` so it can be compared with the
test; ``two_sided=True`` gives the symmetric ``min_i |z_i| / |J_i u|`` (the radius on the
line ``theta + eps u``, ``eps`` of either sign). As the radius goes to zero the empirical
breaking radius along ``u`` agrees with it (ratio -> 1 on a fine grid).

Caveats.
  * Measure zero: the theorem excludes a null set. On it (e.g. a unit with ``z == 0``
    exactly: zero biases meeting a zero input row, or a layer whose inputs are all dead
    meeting a zero bias) a pattern can break at *every* ``eps > 0``; the test reports this
    as breaking at the smallest tested radius and :func:`first_order_radius` as ``0``.
    Default linen init (zero biases) puts models on such a set for some inputs.
  * Grid: the empirical radius is known only to the bracket ``(lower, upper]`` of
    consecutive tested radii, and a flip-and-flip-back between two grid points is not
    seen. The default grid (``refine=0``) is coarse (x3.5 per step); use ``refine`` for the
    fine grid the first-order cross-check needs (``refine=24`` on 1e-4..1e-1: x1.1 per step).
  * Precision: in float32 a step ``eps * u_j`` below ~1e-7 relative to ``theta_j`` is lost to
    rounding; with ``~1e5`` parameters ``|u_j| ~ 3e-3``, so radii below ~1e-4 mostly test
    rounding. Use float64 (``jax.enable_x64``) to test tiny radii.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from regime_jax import bitmask
from regime_jax.capture import PreactsFn
from regime_jax.stability._radius import (
    any_layer,
    as_preacts_fn,
    dtype_of,
    empirical_breaking_radius,
    first_break,
    first_order_radius,
    param_layers,
    radius_quantiles,
    random_directions,
    random_layer_directions,
    sweep_radii,
)

__all__ = [
    "ALL",
    "StabilityConfig",
    "empirical_breaking_radius",
    "first_order_radius",
    "param_layers",
    "perturb",
    "perturbation_metrics",
    "radius_quantiles",
    "random_directions",
    "random_layer_directions",
]

ALL = "all"  # key of the every-layer-together summaries


@dataclasses.dataclass(frozen=True)
class StabilityConfig:
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

    >>> StabilityConfig(num_radii=3, max_radius=1e-4).radii.round(9).tolist()
    [1e-06, 1e-05, 0.0001]
    >>> StabilityConfig(num_radii=2, refine=1).fine_radii.round(9).tolist()
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
                    f"StabilityConfig.{field}={value!r} invalid; allowed values: {allowed}"
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


def perturb(
    preacts_fn: PreactsFn,
    params: Any,
    x: jax.Array,
    key: jax.Array,
    config: StabilityConfig = StabilityConfig(),
) -> dict[str, jax.Array]:
    """Finite-difference stability test of the activation patterns of ``x`` at ``params``.

    Pure; ``jax.jit(perturb, static_argnames=("preacts_fn", "config"))`` compiles it into one
    computation. ``V = num_directions`` (``L * num_directions`` with ``per_layer``), ``R`` =
    ``len(config.radii)``, ``F = len(config.fine_radii)``, ``P = x.shape[0]``; "layer" below
    is a recorded ReLU site (``fc1``, ``block0/ffn``), "param layer" a top-level params key.

    Args:
      preacts_fn: ``preacts_fn(params, x) -> (out, {layer: z})``:
        ``regime_jax.capture_relus(apply_fn)`` for any model, or a linen / NNX module.
        ``out`` (logits ``[P, ...]``) gives ``output_change``.
      params: params pytree (what ``preacts_fn`` takes).
      x: probe inputs ``[P, ...]``.
      key: PRNG key for the directions.
      config: :class:`StabilityConfig` (static).

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
        ``breaking_radius_dir [V, P]``: same per direction (upper end of the bracket);
          ``breaking_radius_dir_lower [V, P]``: tested radius just below it (0 if it broke at
          the first radius; ``fine_radii[-1]`` if it never broke).
        ``first_order_radius [V, P]``: :func:`first_order_radius` per direction.
        ``ratio [V, P]``: ``breaking_radius_dir / first_order_radius`` where both are finite
          and positive, else nan; ``ratio_lower [V, P]``: same with the lower bracket end.
        With ``per_layer``: ``by_param/<param layer>/kept/all [R]``,
          ``.../flip/all [R]``, ``.../output_change [R]`` over that subtree's directions.

    Invariants: kept and flip values lie in [0, 1]; ``kept/all <= kept/<layer>``;
    ``breaking_radius == min_d breaking_radius_dir``; ``breaking_radius_dir_lower <
    breaking_radius_dir``; deterministic in ``key``.

    >>> from regime_jax.models import create_model
    >>> model = create_model({"name": "mlp", "hidden": [8]}, 3)
    >>> x = jax.random.normal(jax.random.key(0), (5, 4))
    >>> params = model.init(jax.random.key(1), x)["params"]
    >>> probe = jax.jit(perturb, static_argnames=("preacts_fn", "config"))
    >>> out = probe(model, params, x, jax.random.key(2), StabilityConfig(num_directions=3))
    >>> out["kept/all"].shape, out["kept/fc1"].shape, out["first_order_radius"].shape
    ((12,), (12,), (3, 5))
    """
    dtype = dtype_of(params)
    preacts_fn = as_preacts_fn(preacts_fn)
    if config.per_layer:
        dirs = random_layer_directions(key, params, config.num_directions)
    else:
        dirs = random_directions(key, params, config.num_directions)
    num_dirs = jax.tree.leaves(dirs)[0].shape[0]
    fine = jnp.asarray(config.fine_radii, dtype)
    coarse = slice(None, None, config.refine + 1)
    changed, flips, out_change, bits = sweep_radii(
        preacts_fn, params, x, dirs, fine, config.radius_batch
    )
    shape = (fine.shape[0], num_dirs, x.shape[0])
    changed_all = any_layer(changed, shape)
    total_bits = sum(bits.values())
    if total_bits == 0:
        raise ValueError(f"no pattern bit to test: x has shape {tuple(x.shape)}")
    if total_bits < bitmask.LIMB_BOUND:
        flips_all = sum(flips.values(), jnp.zeros(shape[:2], jnp.int32))
    else:  # 2^31 bits or more: exact (hi, lo) limbs, no int32 bound baked into the program
        flips_all = bitmask.add_counts(list(flips.values()), total_bits)

    def summaries(sel, prefix: str = "") -> dict[str, jax.Array]:
        res = {
            f"{prefix}kept/{ALL}": jnp.mean(~changed_all[coarse, sel], axis=(1, 2)).astype(dtype),
            f"{prefix}flip/{ALL}": jnp.mean(_rate(flips_all[coarse, sel], total_bits), axis=1),
            f"{prefix}output_change": jnp.mean(out_change[coarse, sel], axis=(1, 2)),
        }
        return {k: v.astype(dtype) for k, v in res.items()}

    result = {"radii": fine[coarse], "fine_radii": fine, **summaries(slice(None))}
    for name in changed:
        result[f"kept/{name}"] = jnp.mean(~changed[name][coarse], axis=(1, 2)).astype(dtype)
        rates = _rate(flips[name][coarse], bits[name])
        result[f"flip/{name}"] = jnp.mean(rates, axis=1).astype(dtype)
    if config.per_layer:
        for li, name in enumerate(param_layers(params)):
            sel = slice(li * config.num_directions, (li + 1) * config.num_directions)
            result.update(summaries(sel, f"by_param/{name}/"))

    upper, lower = first_break(changed_all, fine)
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


def _radius_labels(radii: np.ndarray) -> list[str]:
    labels = [f"{r:.0e}" for r in radii]
    if len(set(labels)) < len(labels):  # grid finer than one digit: keep the labels distinct
        labels = [f"{r:.2e}" for r in radii]
    return labels


def _rate(count: jax.Array, bits: int) -> jax.Array:
    """``count / bits``: as it always was below 2^31 bits; beyond, :func:`bitmask.rate` of the
    exact limbs (an int32 division would overflow the bound and the count)."""
    if bits < bitmask.LIMB_BOUND:
        return count / bits
    return bitmask.rate(count, bits)


def perturbation_metrics(
    preacts_fn: PreactsFn,
    params: Any,
    x: jax.Array,
    key: jax.Array,
    config: StabilityConfig = StabilityConfig(),
) -> dict[str, jax.Array]:
    """Flat scalar summary of :func:`perturb` for ``metrics.jsonl`` (pure, jit-able).

    Keys (``<r>`` = ``f"{radius:.0e}"``, or ``.2e`` if two coarse radii would share a label):
      ``stability/kept@<r>``, ``stability/flip@<r>``, ``stability/output_change@<r>``;
      ``stability/kept/<layer>@<r>``, ``stability/flip/<layer>@<r>`` per recorded layer;
      ``stability/radius_q{10,25,50,75,90}`` (censored quantiles of ``breaking_radius``, inf when
      beyond the grid), ``stability/radius_frac_inf``;
      ``stability/first_order_q{10,25,50,75,90}`` of the per-example first-order radius (min over
      directions, comparable with ``breaking_radius``);
      ``stability/ratio_q50``, ``stability/ratio_lower_q50``: medians over finite (direction,
      example) pairs of ``ratio`` / ``ratio_lower`` (nan if none);
      ``stability/first_order_in_bracket``: fraction of those pairs whose first-order radius
      lies in the empirical bracket;
      with ``per_layer``: ``stability/by_param/<param layer>/{kept,flip,output_change}@<r>``.

    >>> from regime_jax.models import create_model
    >>> model = create_model({"name": "mlp", "hidden": [8]}, 3)
    >>> x = jax.random.normal(jax.random.key(0), (5, 4))
    >>> params = model.init(jax.random.key(1), x)["params"]
    >>> metrics = jax.jit(perturbation_metrics, static_argnames=("preacts_fn", "config"))
    >>> m = metrics(model, params, x, jax.random.key(2), StabilityConfig(num_directions=3))
    >>> float(m["stability/kept@1e-06"]), "stability/radius_q50" in m
    (1.0, True)
    """
    out = perturb(preacts_fn, params, x, key, config)
    labels = _radius_labels(config.radii)
    metrics: dict[str, jax.Array] = {}
    for name, value in out.items():
        head, _, tail = name.rpartition("/")
        if name.startswith(("kept/", "flip/", "by_param/")) or name == "output_change":
            base = head if tail == ALL else name  # kept/all -> kept
            for i, lab in enumerate(labels):
                metrics[f"stability/{base}@{lab}"] = value[i]
    for k, v in radius_quantiles(out["breaking_radius"]).items():
        if not k.startswith("finite_") and k != "num_inf":
            metrics[f"stability/radius_{k}"] = v
    first_order = jnp.min(out["first_order_radius"], axis=0)
    for k, v in radius_quantiles(first_order).items():
        if k.startswith("q"):
            metrics[f"stability/first_order_{k}"] = v
    ratio, ratio_lower = out["ratio"], out["ratio_lower"]
    metrics["stability/ratio_q50"] = jnp.nanmedian(ratio)
    metrics["stability/ratio_lower_q50"] = jnp.nanmedian(ratio_lower)
    finite = jnp.isfinite(ratio)
    in_bracket = finite & (ratio_lower <= 1) & (ratio >= 1)
    metrics["stability/first_order_in_bracket"] = jnp.sum(in_bracket) / jnp.maximum(
        jnp.sum(finite), 1
    )
    return metrics
