"""Find every ReLU in any JAX function, with no edit to it: ``capture_relus(apply_fn)``; and
run the function with its ReLUs gated by a second set of parameters: ``gate_relus(apply_fn)``.

The only package that touches JAX internals (jaxpr equations, primitive names and params,
source info); the interpreter is in ``_jaxpr.py``. Tested on jax 0.10.2; the primitive names
it relies on are listed below.

How it works. ``capture_relus(apply_fn)`` returns ``preacts_fn(params, x, **kw) -> (out,
preacts)``. Each call traces ``apply_fn`` to a jaxpr and evaluates that jaxpr again, equation
by equation, binding the very same primitives (so ``out`` is bit-identical to
``apply_fn(params, x, **kw)``), and keeps the input ``z`` of every ReLU it meets.

What counts as a ReLU (recognised by meaning, ``_infer.py``): an equation computing
``max(z, 0)`` for a floating ``z`` of any dtype: ``max(z, c)`` / ``max(c, z)``,
``select_n(z > c, c, z)`` (``jnp.where(z > 0, z, 0)`` and its mirrored forms), ``z * (z > c)``,
with ``c`` a known zero however it got there (a literal, a constant, a broadcast / cast of one,
an argument of a nested ``jit`` / ``checkpoint`` / ``custom_jvp`` / ``custom_vjp``, a value
closed over by a ``scan`` body). Such a *candidate* is a **layer** (measured) when its
pre-activation has an axis that follows the number of examples (``_sites.py`` traces the
function again with ``P + 1`` examples and compares shapes; that axis is moved to the front)
and it was not reduced over its own units before the max (a variance clamp). Not measured,
and listed in the site table (``preacts_fn.sites(params, x)``, :class:`Site`) with the
reason: statistics and parameters, a max clipped above (``relu6``, ``jnp.clip(z, 0, 6)``),
``max(., 0)`` inside ``jax.nn`` functions other than ``relu`` and flax's norms, and the other
``jax.nn`` activations (``gelu``, ``leaky_relu``, ...).

Sub-computations (primitive names as of jax 0.10):
  * ``jit`` / ``pjit``, ``closed_call``, ``core_call``: evaluated inline.
  * ``custom_jvp_call``, ``custom_vjp_call``: the output comes from the original call (so its
    custom derivative rule is kept); the pre-activations inside are read off its body.
  * ``remat2`` / ``checkpoint`` (``jax.checkpoint``, ``nn.remat``, ``nnx.remat``): re-wrapped
    in ``jax.checkpoint`` with the same policy.
  * ``scan`` (``lax.scan``, ``nn.scan``, ``nnx.scan``): re-run through ``lax.scan`` with the
    pre-activations as extra stacked outputs; **each iteration becomes its own key**,
    ``<name>[i]`` (``i`` = index along the scanned axis, also with ``reverse=True``).
  * ``cond`` (``lax.cond``, ``lax.switch``) and ``while`` (``lax.while_loop``,
    ``lax.fori_loop`` with a traced trip count) holding a ReLU are **refused**
    (:class:`CaptureError` naming the construct): which units exist would depend on the data.
    Without a ReLU inside they are evaluated unchanged. A *vmapped* ``cond`` / ``switch``
    becomes a per-example ``select_n`` between branches that all run: a ReLU in some but not
    all of its branches is refused too (it would count examples its branch did not serve).
  * Any other primitive that holds a sub-computation with a ReLU inside is refused, naming
    the primitive and the jax version; one without a ReLU inside is evaluated unchanged.
    ReLUs are never skipped silently.

Names. A pre-activation is named by the path of the module that produced it: the JAX name
stack of the equation that computed ``z`` (linen pushes every module's path; ``nn.Dense(4,
name="a")`` gives ``a``, a Dense ``fc1`` inside ``block0/ffn`` gives ``block0/ffn/fc1``).
The leading component shared by every named equation of the function (linen's root module
class, e.g. ``MLP``) is dropped. Where there is no name (NNX, plain JAX, or ``z`` computed
in the root scope) the site is named after the module of the dot / conv kernel that produced
``z`` (its parameter path less the leaf: ``fc1/kernel`` gives ``fc1``), else ``relu_<k>``,
``k`` the candidate's index in trace order. A name taken by an earlier ReLU gets ``#<n>``
appended (``fc1#1``). Names depend only on the function, never on the values: every trace
gives the same names.

Beyond ReLU (opt-in). ``capture_relus(apply_fn, activations=("gelu",))`` (any of
:data:`ACTIVATIONS`) records the input ``z`` of each call of those ``jax.nn`` functions too,
keyed ``<name>:<function>`` (``block0/ffn/fc1:gelu``), so that a GELU bit is never read as a
ReLU bit; the bit is ``z > 0`` as for ReLU. Without the opt-in they are listed as not
measured, and a function with no ReLU is refused as before (``_acts.py``).

Gating (:func:`gate_relus`). ``gated_fn(values, gates, *args, **kw)`` evaluates the same
jaxpr twice in lockstep, once with ``gates`` in place of the params (the *gate network*, an
ordinary ReLU net) and once with ``values`` (the *value network*), the other arguments shared.
At every ReLU the value stream takes ``h_v = where(z_g > 0, z_v, max(z_g, 0))``: ``z_v`` where
the gate network's unit is on, else 0 (the gate's own ReLU output, which is 0 there; a NaN
gate stays NaN). This is ``z_v * [z_g > 0]``, and with ``gates`` equal to ``values`` it is
``max(z_v, 0)`` bit for bit (-0.0 and NaN included): the gated function is then the function.
Inside ``custom_jvp`` / ``custom_vjp`` calls holding a ReLU the body is evaluated for both
streams (the value stream is gated, so the custom rule gives way to the gating); ``jit``,
``remat`` and ``scan`` are handled as above (a scan's carries run paired, one per stream);
``cond`` / ``while`` holding a ReLU are refused the same way. ``gates`` is wrapped in
``lax.stop_gradient``: gradients flow to ``values`` only.

>>> import jax, jax.numpy as jnp
>>> def apply_fn(params, x):
...     return jnp.maximum(x @ params["w"], 0.0) @ params["v"]
>>> params = {"w": jnp.ones((3, 4)), "v": jnp.ones((4, 2))}
>>> out, preacts = capture_relus(apply_fn)(params, jnp.ones((5, 3)))
>>> {k: z.shape for k, z in preacts.items()}  # named after its kernel, params["w"]
{'w': (5, 4)}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from regime_jax.capture import _acts, _jaxpr, _sites
from regime_jax.capture._jaxpr import WHAT_IS_RECOGNISED, CaptureError, Recorder, evaluate, names
from regime_jax.capture._sites import Site, format_sites, key_names

ACTIVATIONS = _acts.ACTIVATIONS  # the names ``activations=`` takes
DEFAULT_ACTIVATIONS = _acts.DEFAULT  # ReLU only

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_ACTIVATIONS",
    "WHAT_IS_RECOGNISED",
    "CaptureError",
    "GatedFn",
    "PreactsFn",
    "Site",
    "capture_relus",
    "format_sites",
    "gate_relus",
    "key_names",
    "mask_relus",
]

PreactsFn = Callable[..., tuple[Any, dict[str, jax.Array]]]
GatedFn = Callable[..., tuple[Any, dict[str, jax.Array], dict[str, jax.Array]]]
MaskedFn = Callable[..., tuple[Any, dict[str, jax.Array]]]
_CACHE_SIZE = 64


def _check_callable(apply_fn: Any, who: str) -> None:
    """A module object is not ``apply_fn(params, x)``: say which function to pass instead."""
    kind = type(apply_fn).__module__ or ""
    if kind.startswith("flax.") or any(
        c.__module__.startswith("flax.") for c in type(apply_fn).__mro__[1:-1]
    ):
        if hasattr(apply_fn, "apply"):  # linen
            raise TypeError(f"{who} takes apply_fn(params, x): pass model.apply")
        raise TypeError(
            f"{who} takes apply_fn(params, x): for an NNX module pass "
            "rj.nnx_apply(module)[0] (with its state, rj.nnx_apply(module)[1])"
        )
    if not callable(apply_fn):
        raise TypeError(f"{who} takes a function apply_fn(params, x), got {apply_fn!r}")


def _signature(params: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    """A hashable key of everything the analysis depends on (None: do not cache)."""
    dynamic, static = _sites.split_kwargs(kwargs)
    leaves, treedef = jax.tree.flatten((params, args, dynamic))
    avals = tuple((np.shape(x), str(jnp.result_type(x))) for x in leaves)
    key = (treedef, avals, tuple(sorted(static.items())))
    try:
        hash(key)
    except TypeError:
        return None
    return key


class _Prepared(NamedTuple):
    """One trace of the function, ready to evaluate."""

    closed: Any  # the closed jaxpr
    out_shape: Any
    rest: list[Any]  # the flat inputs after the params
    infos: list[_sites.Info]  # one per flat input: parameter paths, the input tagged
    an: _sites.Analysis


class _Captured:
    """The traced function, what its analysis decided, and the evaluation of it."""

    def __init__(self, apply_fn: Callable[..., Any], acts: frozenset):
        self.apply_fn = apply_fn
        self.acts = acts
        self.cache: dict[Any, _sites.Analysis] = {}

    def prepare(self, params: Any, args: tuple, kwargs: dict[str, Any]) -> _Prepared:
        """Traces the function at these inputs; its analysis is cached per signature."""
        closed, out_shape = _sites.trace(self.apply_fn, params, args, kwargs)
        key = _signature(params, args, kwargs)
        an = self.cache.get(key) if key is not None else None
        if an is None:
            an = _sites.analyse(self.apply_fn, params, args, kwargs, closed, self.acts)
            if key is not None:
                if len(self.cache) >= _CACHE_SIZE:
                    self.cache.pop(next(iter(self.cache)))
                self.cache[key] = an
        dynamic, _ = _sites.split_kwargs(kwargs)
        infos = _sites.input_infos(params, args, dynamic)
        return _Prepared(closed, out_shape, jax.tree.leaves((args, dynamic)), infos, an)

    def run(self, prep: _Prepared, inputs: list[tuple[Any, ...]], streams: int, masks: Any = None):
        """``(out of stream 0, [(name, site, per-stream z, each probe-major)])``; ``masks``
        (one stream): ``{site: bool mask as traced}``, each taken ReLU becomes ``z * mask``."""
        rec = Recorder(streams, take=prep.an.take, acts=self.acts)
        rec.masks = masks
        _sites._infer.reset_value_numbers()
        closed, infos = prep.closed, prep.infos
        outs, _, _ = evaluate(
            closed.jaxpr, closed.consts, inputs, infos, [""] * len(infos), "", rec
        )
        out = jax.tree.unflatten(jax.tree.structure(prep.out_shape), [o[0] for o in outs])
        axes = prep.an.axes
        recorded = [
            (name, e.site, tuple(_sites.to_probe_major(z, axes[e.site]) for z in e.value))
            for name, e in names(rec.entries, prep.an.root)
        ]
        return out, recorded

    def sites(self, params: Any, args: tuple, kwargs: dict[str, Any]) -> list[Site]:
        def shapes(params, args):
            prep = self.prepare(params, args, kwargs)
            inputs = [(leaf,) for leaf in (*jax.tree.leaves(params), *prep.rest)]
            _, recorded = self.run(prep, inputs, streams=1)
            found.append((prep.an, [(n, s) for n, s, _ in recorded]))
            return [zs[0] for _, _, zs in recorded]

        found: list = []
        out = jax.eval_shape(shapes, params, args)
        an, keys = found[-1]
        recorded = [(n, s, tuple(z.shape)) for (n, s), z in zip(keys, out, strict=True)]
        return _sites.table(an, recorded)


def capture_relus(
    apply_fn: Callable[..., Any], activations: tuple[str, ...] = DEFAULT_ACTIVATIONS
) -> PreactsFn:
    """Wraps ``apply_fn`` so that it also returns the pre-activation of every ReLU it applies.

    Args:
      apply_fn: ``apply_fn(params, x, **kw) -> out``, any JAX-traceable function, left as
        its author wrote it (a linen ``model.apply`` with variables, an NNX forward through
        ``nnx.merge``, plain JAX).
      activations: the functions whose pre-activations are recorded (opt-in beyond ReLU),
        names from :data:`ACTIVATIONS`: ``relu`` (the default, alone), ``leaky_relu``,
        ``gelu`` (both forms of ``jax.nn.gelu``), ``silu`` / ``swish``, ``elu``; each calls of
        ``jax.nn.<name>`` (= flax's). A site of a function other than ReLU is keyed
        ``<name>:<function>`` (``block0/ffn/fc1:gelu``); its bit is ``z > 0`` too, and for
        these functions ``f(z) > 0 <=> z > 0``. ``("gelu",)`` leaves ReLUs unrecorded.

    Returns:
      ``preacts_fn(params, x, **kw) -> (out, preacts)``: ``out`` is ``apply_fn(params, x,
      **kw)`` (bit-identical op by op; under jit up to XLA's fusion); ``preacts`` maps each
      layer's name (module docstring) to its pre-activation ``z`` as ``[P, positions...,
      units]`` (the probe axis first), in trace order. ``preacts_fn.sites(params, x)`` gives
      the site table (:class:`Site`). A unit is on iff ``z > 0``. Pure and jit-able;
      keyword arguments pass through (array values are traced, others are static).

    Raises:
      CaptureError: (a ValueError) when tracing finds no ReLU (none of ``activations``), or a
        ReLU inside a construct that cannot be captured (``lax.cond``, ``lax.while_loop``, an
        unknown primitive).
      ValueError: a name in ``activations`` outside :data:`ACTIVATIONS`.

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> class MLP(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(2, name="head")(nn.relu(nn.Dense(8, name="fc1")(x)))
    >>> model, x = MLP(), jnp.ones((4, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> out, preacts = capture_relus(model.apply)(variables, x)
    >>> list(preacts), preacts["fc1"].shape
    (['fc1'], (4, 8))
    """

    _check_callable(apply_fn, "capture_relus")
    captured = _Captured(apply_fn, _acts.normalise(activations))

    def preacts_fn(params: Any, x: Any, **kwargs: Any) -> tuple[Any, dict[str, jax.Array]]:
        prep = captured.prepare(params, (x,), kwargs)
        inputs = [(leaf,) for leaf in (*jax.tree.leaves(params), *prep.rest)]
        out, recorded = captured.run(prep, inputs, streams=1)
        return out, {name: zs[0] for name, _, zs in recorded}

    def sites(params: Any, x: Any, **kwargs: Any) -> list[Site]:
        return captured.sites(params, (x,), kwargs)

    preacts_fn.__wrapped__ = apply_fn  # type: ignore[attr-defined]
    preacts_fn.sites = sites  # type: ignore[attr-defined]
    return preacts_fn


def _check_gates(values: Any, gates: Any) -> None:
    v_def, g_def = jax.tree.structure(values), jax.tree.structure(gates)
    if v_def != g_def:
        raise ValueError(f"gates must be a tree like values: got {g_def} for values {v_def}")
    for (path, v), g in zip(
        jax.tree_util.tree_leaves_with_path(values), jax.tree.leaves(gates), strict=True
    ):
        v_type, g_type = (np.shape(v), jnp.result_type(v)), (np.shape(g), jnp.result_type(g))
        if v_type != g_type:
            raise ValueError(
                f"gates{jax.tree_util.keystr(path)} has (shape, dtype) {g_type} but values has "
                f"{v_type}: gates must be parameters of the same network"
            )


def gate_relus(
    apply_fn: Callable[..., Any], activations: tuple[str, ...] = DEFAULT_ACTIVATIONS
) -> GatedFn:
    """The gated transform of ``apply_fn``: ReLUs switched by frozen gates, values trained.

    Args:
      apply_fn: ``apply_fn(params, *args, **kw) -> out``, as for :func:`capture_relus`.
      activations: as for :func:`capture_relus`. An opted-in ``f(z) = z * g(z)`` becomes
        ``z_v * g(z_g)`` (gelu: ``g`` = Phi or its tanh form, silu: the sigmoid);
        ``leaky_relu`` becomes ``where(z_g >= 0, z_v, slope * z_v)``; ``elu`` is refused
        (CaptureError: its negative branch is no product with ``z``).

    Returns:
      ``gated_fn(values, gates, *args, **kw) -> (out, z_values, z_gates)``. ``values`` and
      ``gates`` are two parameter sets of the same network (same tree, shapes and dtypes);
      ``*args`` / ``**kw`` are shared by both. Every ReLU ``max(z, 0)`` of the value network
      becomes ``z_v * [z_g > 0]``, its unit switched by the gate network (the same function
      run on ``gates``, an ordinary ReLU net) on the same input (module docstring). ``out`` is
      the value network's output; ``z_values`` / ``z_gates`` map each ReLU's name (the names
      of :func:`capture_relus`) to the value / gate network's pre-activation there.
      Invariants: with ``gates`` equal to ``values``, ``out`` is bit-identical to
      ``apply_fn(values, *args, **kw)`` and ``z_values``, ``z_gates`` to capture's
      ``preacts``; no gradient reaches ``gates`` (``lax.stop_gradient``). Pure and jit-able;
      under ``jax.jit`` it traces once per input signature.

    Raises:
      CaptureError: as :func:`capture_relus` (no ReLU; a ReLU in ``cond`` / ``while``).
      ValueError: ``gates`` not a tree of the same shapes and dtypes as ``values``.

    >>> import jax, jax.numpy as jnp
    >>> apply_fn = lambda p, x: jnp.maximum(x @ p["w"], 0.0) @ p["v"]
    >>> values = {"w": jnp.array([[1.0, -1.0]]), "v": jnp.ones((2, 1))}
    >>> gates = {"w": jnp.array([[-1.0, 1.0]]), "v": jnp.ones((2, 1))}
    >>> out, z_values, z_gates = gate_relus(apply_fn)(values, gates, jnp.array([[2.0]]))
    >>> out.tolist(), z_values["w"].tolist(), z_gates["w"].tolist()
    ([[-2.0]], [[2.0, -2.0]], [[-2.0, 2.0]])
    """

    _check_callable(apply_fn, "gate_relus")
    captured = _Captured(apply_fn, _acts.normalise(activations))

    def gated_fn(
        values: Any, gates: Any, *args: Any, **kwargs: Any
    ) -> tuple[Any, dict[str, jax.Array], dict[str, jax.Array]]:
        prep = captured.prepare(values, args, kwargs)
        _check_gates(values, gates)
        gates = jax.lax.stop_gradient(gates)
        pairs = zip(jax.tree.leaves(values), jax.tree.leaves(gates), strict=True)
        inputs = [*pairs, *((leaf, leaf) for leaf in prep.rest)]
        out, recorded = captured.run(prep, inputs, streams=2)
        return out, {n: z[0] for n, _, z in recorded}, {n: z[1] for n, _, z in recorded}

    gated_fn.__wrapped__ = apply_fn  # type: ignore[attr-defined]
    return gated_fn


def _layer_sites(an: _sites.Analysis) -> list[tuple[str, Any]]:
    """``[(name, candidate)]`` of the measured sites, named as a run names them; refused
    (CaptureError) when a site is inside a scan (one site, several keys)."""
    taken = [c for c in an.candidates if c.site in an.take]
    scanned = [c for c in taken if c.scans]
    if scanned:
        raise CaptureError(
            f"mask_relus: the ReLU at {scanned[0].source or 'site ' + str(scanned[0].site)} is "
            f"inside a scan; masks are taken for ReLUs outside scans only"
        )
    entries = [_jaxpr.Entry(c.scope, c.site, "", None, c.module) for c in taken]
    by_site = {c.site: c for c in taken}
    return [(name, by_site[e.site]) for name, e in names(entries, an.root)]


def _as_traced(mask: jax.Array, shape: tuple[int, ...], axis: int) -> jax.Array:
    """A probe-major mask ``[P, positions..., units]`` in the layout its ReLU traced."""
    if len(shape) == 1:
        mask = mask[:, 0]
    return jnp.moveaxis(mask, 0, axis) if axis else mask


def mask_relus(apply_fn: Callable[..., Any]) -> MaskedFn:
    """``apply_fn`` with every ReLU replaced by its input times a given mask.

    The gated transform (:func:`gate_relus`) with the gate network's ``z_g > 0`` replaced by
    stored masks, so no gate forward runs: once gates are frozen, a training example's masks
    are fixed, and the value network of :func:`gate_relus` is ``masked_fn(values, [z_g > 0],
    x)`` with the same output (``where(mask, z, 0)`` at every ReLU).

    Args:
      apply_fn: ``apply_fn(params, x, **kw) -> out``, as for :func:`capture_relus`.

    Returns:
      ``masked_fn(params, masks, x, **kw) -> (out, preacts)``: ``masks`` maps every layer's
      name (the keys of :func:`capture_relus`'s ``preacts``) to a bool ``[P, positions...,
      units]`` (probe-major, like ``preacts``); ``out`` is the output with each ReLU's
      ``max(z, 0)`` replaced by ``where(mask, z, 0)``, ``preacts`` the masked network's own
      pre-activations ``z``. With ``masks`` the function's own ``z > 0`` the output equals
      ``apply_fn(params, x)`` (-0.0 aside). Pure and jit-able.

    Raises:
      CaptureError: as :func:`capture_relus`, and for a ReLU inside a ``scan`` (its masks
        would be per iteration; not supported).
      ValueError: ``masks`` without exactly the layers, or with another shape than their
        pre-activations.

    >>> import jax.numpy as jnp
    >>> apply_fn = lambda p, x: jnp.maximum(x @ p["w"], 0.0).sum(-1)
    >>> params, x = {"w": jnp.array([[1.0, -1.0]])}, jnp.array([[2.0]])
    >>> out, z = mask_relus(apply_fn)(params, {"w": jnp.array([[False, True]])}, x)
    >>> out.tolist(), z["w"].tolist()
    ([-2.0], [[2.0, -2.0]])
    """

    _check_callable(apply_fn, "mask_relus")
    captured = _Captured(apply_fn, _acts.normalise(("relu",)))  # masks are ReLU bits

    def masked_fn(
        params: Any, masks: Any, x: Any, **kwargs: Any
    ) -> tuple[Any, dict[str, jax.Array]]:
        prep = captured.prepare(params, (x,), kwargs)
        layers = _layer_sites(prep.an)
        if set(masks) != {name for name, _ in layers}:
            raise ValueError(
                f"mask_relus: masks have layers {sorted(masks)} but the function has "
                f"{[name for name, _ in layers]}"
            )
        traced = {}
        for name, c in layers:
            axis, mask = prep.an.axes[c.site], masks[name]
            major = (c.shape[axis], *c.shape[:axis], *c.shape[axis + 1 :])
            major = major if len(major) > 1 else (*major, 1)
            if tuple(mask.shape) != major:
                raise ValueError(
                    f"mask_relus: masks[{name!r}] has shape {tuple(mask.shape)}, its "
                    f"pre-activation {major}"
                )
            traced[c.site] = _as_traced(mask, c.shape, axis)
        inputs = [(leaf,) for leaf in (*jax.tree.leaves(params), *prep.rest)]
        out, recorded = captured.run(prep, inputs, streams=1, masks=traced)
        if [n for n, _, _ in recorded] != [n for n, _ in layers]:  # static: a naming mismatch
            raise CaptureError(f"mask_relus: sites {[n for n, _, _ in recorded]} named apart")
        return out, {name: zs[0] for name, _, zs in recorded}

    masked_fn.__wrapped__ = apply_fn  # type: ignore[attr-defined]
    return masked_fn
