"""Which ReLU candidates are layers, and on which axis their probe examples lie (private).

:func:`analyse` traces the function twice, with ``P`` and with ``P + 1`` examples, walks both
jaxprs without numbers (:func:`regime_jax.capture._jaxpr.evaluate` with ``args=None``) and
compares each candidate's pre-activation shape across the two: the one axis whose size follows
the number of examples is the probe axis. A candidate is *taken* (a layer) when its
pre-activation has such an axis and was not reduced over its own units before the max; else
it is listed with the reason (:class:`Site`). Nothing is guessed from a size that happens to
equal ``P``: a ``vmap`` ensemble's member axis stays a unit axis whatever its size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from regime_jax.capture import _acts, _infer, _jaxpr
from regime_jax.capture._infer import Info
from regime_jax.capture._jaxpr import WHAT_IS_RECOGNISED, Candidate, CaptureError, Recorder

NOT_PER_EXAMPLE = "does not depend on the example (a parameter, or a statistic of the batch)"
A_STATISTIC = "a statistic of each example (reduced over its units before the max: a variance)"
CLIPPED = "clipped above as well (relu6, jnp.clip(z, 0, hi)): a second kink, not measured"


@dataclasses.dataclass(frozen=True)
class Site:
    """One row of a function's site table (``preacts_fn.sites(params, x)``).

    Attributes:
      name: the key in ``preacts`` (for a site not taken: the name it would have).
      taken: whether it is measured (a layer).
      reason: why it is not taken ('' when taken).
      shape: the pre-activation's shape as ``preacts`` holds it, ``[P, positions..., units]``
        (for a site not taken: as traced).
      probe_axis: the axis of the traced pre-activation that carries the probe examples
        (moved to axis 0 in ``preacts``); None when there is none.
      units: units per position (the last axis); None for a site not taken.
      dtype: the pre-activation's dtype.
      spelling: how the ReLU was written (``jax.nn.relu``, ``jnp.clip``, ``jnp.where``...).
      source: ``file:line`` of the code that applied it.
      params: the parameter leaves that produce its pre-activation (the dot / conv kernel
        and what reaches it after: bias, norm scale and statistics), sorted.
    """

    name: str
    taken: bool
    reason: str
    shape: tuple[int, ...]
    probe_axis: int | None
    units: int | None
    dtype: str
    spelling: str
    source: str
    params: tuple[str, ...]


def format_sites(sites: list[Site]) -> str:
    """The site table as aligned text (what the built-in loop prints and writes)."""
    head = ("site", "measured", "shape", "probe axis", "dtype", "spelling", "source", "params")
    rows = [head]
    for s in sites:
        rows.append(
            (
                s.name,
                "yes" if s.taken else f"no: {s.reason}",
                "x".join(map(str, s.shape)) or "()",
                "-" if s.probe_axis is None else str(s.probe_axis),
                s.dtype,
                s.spelling,
                s.source.rsplit("/", 1)[-1],
                ", ".join(s.params) or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)), r[-1]]).rstrip()
        for r in rows
    )


class Analysis(NamedTuple):
    """What :func:`analyse` decided for one input signature (no arrays: safe to cache)."""

    take: frozenset  # site indices measured
    axes: dict[int, int]  # site index -> probe axis of its traced pre-activation
    candidates: tuple[Candidate, ...]
    reasons: dict[int, str]  # site index -> why not taken
    notes: tuple[tuple[str, str, str], ...]  # (spelling, source, why not measured)
    root: str


def split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Array-valued keyword arguments are traced; the rest (``train=False``) stay static."""
    dynamic, static = {}, {}
    for k, v in kwargs.items():
        leaves = jax.tree.leaves(v)
        is_array = leaves and all(isinstance(leaf, jax.Array | np.ndarray) for leaf in leaves)
        (dynamic if is_array else static)[k] = v
    return dynamic, static


def key_names(keypath: tuple) -> tuple:
    """A pytree key path as plain names (dict keys, sequence indices, attribute names), an NNX
    ``Variable``'s trailing ``.value`` dropped: the one spelling of a parameter's path that
    site names, step-size parts and NNX state checks share.

    >>> key_names(jax.tree_util.tree_flatten_with_path({"fc1": [0.0]})[0][0][0])
    ('fc1', 0)
    """
    names = []
    for k in keypath:
        for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
            if hasattr(k, attr):
                names.append(getattr(k, attr))
                break
        else:
            names.append(str(k))
    if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names.pop()
    return tuple(names)


def _path(keypath: tuple) -> str:
    return "/".join(map(str, key_names(keypath)))


def param_paths(params: Any) -> list[str]:
    """Each parameter leaf's path, as step sizes name parts: linen's ``params`` collection and
    a chain of single entries at the top are looked through (``{"params": {"fc1": ...}}``
    gives ``fc1/kernel``); other collections keep their name (``batch_stats/bn1/mean``)."""
    paths = [_path(p).split("/") for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if paths and all(len(p) > 1 for p in paths):
        if all(p[0] == paths[0][0] for p in paths):
            while all(len(p) > 1 and p[0] == paths[0][0] for p in paths):
                paths = [p[1:] for p in paths]
        else:
            paths = [p[1:] if p[0] == "params" else p for p in paths]
    return ["/".join(p) for p in paths]


def input_infos(params: Any, args: tuple, dynamic: dict) -> list[Info]:
    """One Info per flat input: parameter leaves by path, every other input tagged ``x``."""
    paths = param_paths(params)
    n_rest = len(jax.tree.leaves((args, dynamic)))
    return [Info(src=p) for p in paths] + [Info(tags=frozenset({"x"})) for _ in range(n_rest)]


def trace(apply_fn: Callable[..., Any], params: Any, args: tuple, kwargs: dict[str, Any]):
    """``(closed jaxpr, output shape)`` of ``apply_fn(params, *args, **kwargs)``."""
    dynamic, static = split_kwargs(kwargs)

    def flat_fn(params, args, dynamic):
        return apply_fn(params, *args, **dynamic, **static)

    return jax.make_jaxpr(flat_fn, return_shape=True)(params, args, dynamic)


def _walk(closed, infos: list[Info], acts: frozenset) -> Recorder:
    _infer.reset_value_numbers()
    rec = Recorder(0, analyse=True, acts=acts)
    _jaxpr.evaluate(closed.jaxpr, closed.consts, None, infos, [""] * len(infos), "", rec)
    return rec


def num_examples(x: Any) -> int:
    """P: the common leading size of every leaf of the probe input ``x``."""
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(x)}
    if len(sizes) != 1 or None in sizes:
        raise CaptureError(
            f"capture needs the examples on axis 0 of every leaf of the input; got leading "
            f"sizes {sorted(map(str, sizes))}"
        )
    return sizes.pop()


def _shifted(tree: Any, n: int, p2: int) -> Any:
    def shift(leaf):
        shape = np.shape(leaf)
        if len(shape) and shape[0] == n:
            return jax.ShapeDtypeStruct((p2, *shape[1:]), jax.numpy.result_type(leaf))
        return leaf

    return jax.tree.map(shift, tree)


def analyse(
    apply_fn: Callable[..., Any],
    params: Any,
    args: tuple,
    kwargs: dict[str, Any],
    closed,
    acts: frozenset = frozenset(_acts.DEFAULT),
) -> Analysis:
    """Decides, for every candidate of ``closed`` (traced at ``args``), taken or why not;
    ``acts``: the functions recorded (``relu`` and the opted-in others)."""
    dynamic, _ = split_kwargs(kwargs)
    infos = input_infos(params, args, dynamic)
    rec = _walk(closed, infos, acts)
    notes = tuple((sp, src, why) for (sp, src), why in rec.notes.items())
    if not rec.candidates:
        raise _no_relu(apply_fn, notes, [], acts)
    p = num_examples(args[0])
    shifted = None
    errors = []
    for p2 in (p + 1, 2 * p + 1):
        try:
            kw2 = {k: _shifted(v, p, p2) for k, v in kwargs.items()}
            args2 = (_shifted(args[0], p, p2), *args[1:])
            closed2, _ = trace(apply_fn, params, args2, kw2)
        except Exception as err:  # the model cannot take another number of examples
            errors.append(f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
            continue
        shifted = (p2, _walk(closed2, input_infos(params, args2, split_kwargs(kw2)[0]), acts))
        break
    if shifted is None:
        raise CaptureError(
            f"capture finds a ReLU's probe axis by tracing the function with another number "
            f"of examples than {p}, and that failed ({errors[0]}): pass inputs with the "
            f"examples on axis 0 and no size fixed to {p}"
        )
    p2, rec2 = shifted
    if [(c.form, c.scope) for c in rec.candidates] != [(c.form, c.scope) for c in rec2.candidates]:
        raise CaptureError(
            f"the function applies different ReLUs with {p} and with {p2} examples (a Python "
            f"branch on the batch size?): its layers would depend on the probe size"
        )
    take, axes, reasons = set(), {}, {}
    for c, c2 in zip(rec.candidates, rec2.candidates, strict=True):
        where = f"{c.spelling} at {c.source or '?'}"
        if c.site in rec.routed:
            raise CaptureError(
                f"a ReLU ({where}) sits in one branch of a vmapped lax.cond / lax.switch: it "
                f"is computed for every example but serves only the examples routed to its "
                f"branch, so its pattern would count examples it did not serve. Compute the "
                f"branches densely (jnp.where on their outputs) or capture each branch as its "
                f"own function"
            )
        if c.scans != c2.scans:
            raise CaptureError(
                f"a ReLU ({where}) is inside a lax.scan / lax.map over the probe examples "
                f"(its length follows the number of examples): use jax.vmap over examples"
            )
        diff = [a for a, (s1, s2) in enumerate(zip(c.shape, c2.shape, strict=False)) if s1 != s2]
        if len(c.shape) != len(c2.shape):
            diff = [-1]
        if c.site in rec.clipped:
            reasons[c.site] = CLIPPED
        elif not diff:
            reasons[c.site] = NOT_PER_EXAMPLE
        elif len(diff) == 1 and c.shape[diff[0]] == p and c2.shape[diff[0]] == p2:
            if c.tags == frozenset({"reduce"}):
                reasons[c.site] = A_STATISTIC
            else:
                take.add(c.site)
                axes[c.site] = diff[0]
        else:
            raise CaptureError(
                f"a ReLU ({where}) has pre-activations of shape {c.shape} with {p} examples "
                f"and {c2.shape} with {p2}: the examples do not have an axis of their own "
                f"(merged with another axis by a reshape?), so the pattern of one example "
                f"cannot be told apart; keep the examples on their own axis"
            )
    if not take:
        raise _no_relu(apply_fn, notes, [(c, reasons[c.site]) for c in rec.candidates], acts)
    return Analysis(
        frozenset(take), axes, tuple(rec.candidates), reasons, notes, _jaxpr.root(closed.jaxpr)
    )


def _no_relu(apply_fn, notes, rejected, acts: frozenset) -> CaptureError:
    seen = [f"{sp} ({why})" for sp, _, why in notes]
    seen += [f"{c.spelling} at {c.source.rsplit('/', 1)[-1]} ({why})" for c, why in rejected]
    found = f"; found but not measured: {'; '.join(seen[:6])}" if seen else ""
    if acts == frozenset(_acts.DEFAULT):
        return CaptureError(
            f"no ReLU found in {getattr(apply_fn, '__qualname__', apply_fn)!r}: activation "
            f"patterns are defined for ReLU units only ({WHAT_IS_RECOGNISED}){found}; to "
            f"record the sign of another activation's pre-activation, opt in with "
            f"activations=(...) from {list(_acts.ACTIVATIONS)}"
        )
    return CaptureError(
        f"none of the activations {sorted(acts)} found in "
        f"{getattr(apply_fn, '__qualname__', apply_fn)!r} ({WHAT_IS_RECOGNISED}){found}"
    )


def to_probe_major(z: jax.Array, axis: int) -> jax.Array:
    """A taken pre-activation as ``[P, positions..., units]``: probe axis first."""
    z = jax.numpy.moveaxis(z, axis, 0) if axis else z
    return z[:, None] if z.ndim == 1 else z


def table(an: Analysis, recorded: list[tuple[str, int, tuple]]) -> list[Site]:
    """The site table: one row per recorded key, then the candidates and notes not taken."""
    by_site = {c.site: c for c in an.candidates}
    rows = []
    for name, site, shape in recorded:
        c = by_site[site]
        rows.append(
            Site(
                name,
                True,
                "",
                shape,
                an.axes[site],
                shape[-1],
                c.dtype,
                c.spelling,
                c.source,
                tuple(sorted(c.feeds)),
            )
        )
    for c in an.candidates:
        if c.site in an.take:
            continue
        fn = c.form if c.form in _acts.ACTIVATIONS else _acts.RELU
        name = _jaxpr.name_of(c.scope, c.module, c.site, an.root, fn) + _jaxpr.fn_suffix(fn)
        rows.append(
            Site(
                name,
                False,
                an.reasons[c.site],
                c.shape,
                None,
                None,
                c.dtype,
                c.spelling,
                c.source,
                tuple(sorted(c.feeds)),
            )
        )
    for sp, src, why in an.notes:
        rows.append(Site(sp, False, why, (), None, None, "", sp, src, ()))
    return rows
