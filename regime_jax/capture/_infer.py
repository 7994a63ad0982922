"""What capture knows about every value of a jaxpr without its numbers (private; JAX internals).

An :class:`Info` per value says whether it is a known zero, how it depends on the input, which
parameter leaf it is, which parameters produced it, which ReLU sites it depends on, and
whether it is a comparison of some value with zero. The same propagation runs in the
analysis walk (:mod:`regime_jax.capture._sites`, no numbers) and in the interpreter
(:mod:`regime_jax.capture._jaxpr`), so both see the same sites in the same order.

A ReLU *candidate* is an equation that computes ``max(z, 0)`` for a floating ``z``, spelled
as ``max(z, c)`` / ``max(c, z)``, ``select_n(z > c, c, z)`` (``jnp.where(z > 0, z, 0)``, and
the mirrored ``z <= 0`` forms) or ``z * (z > c)``, with ``c`` a known zero of any dtype: a
literal, an all-zero constant, a broadcast / reshape / cast of one, or an argument of a
sub-computation (``jit``, ``checkpoint``, ``custom_jvp`` / ``custom_vjp``, a ``scan``'s
constants) that is one.

Tested on jax 0.10.2.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

_IDS = itertools.count()

# Equations that keep an all-zero operand all-zero, and a parameter leaf that parameter leaf.
_SHAPE_OPS = frozenset(
    {
        "broadcast_in_dim",
        "convert_element_type",
        "reshape",
        "squeeze",
        "expand_dims",
        "copy",
        "copy_p",
        "transpose",
        "rev",
        "reduce_precision",
    }
)
_MIXING = frozenset({"dot_general", "conv_general_dilated", "ragged_dot", "ragged_dot_general"})
_REDUCTIONS = frozenset(
    {
        "reduce_sum",
        "reduce_max",
        "reduce_min",
        "reduce_prod",
        "reduce_and",
        "reduce_or",
        "argmax",
        "argmin",
    }
)
_POSITIVE = {"gt": True, "ge": True, "lt": False, "le": False}  # op(z, 0): is it "z > 0"?
_MIRROR = {"gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}  # op(0, z) == _MIRROR[op](z, 0)


class Info:
    """What is known about one value (shared by all streams).

    Attributes:
      zero: it holds only zeros.
      tags: how it depends on the probe input: ``"x"`` directly (elementwise), ``"dot"``
        through a dot / conv, ``"reduce"`` through a reduction over its units (last) axis;
        empty if it does not depend on the input.
      src: the parameter leaf it is, up to shape and dtype changes (``"fc1/kernel"``).
      kernels: the parameter leaves of the nearest dot / conv that produced it.
      feeds: every parameter leaf that reached it since that dot / conv (bias, norm scale).
      sites: indices of the ReLU candidates it depends on.
      vid: the value's identity (kept across sub-computation boundaries).
      cmp: ``(vid, positive)`` when it is ``z > 0`` (positive) or ``z <= 0`` of value ``vid``.
      indicator: ``cmp`` holds for a float 0/1 cast of that comparison (``z * (z > 0)``).
      relu_of: the candidate index whose ReLU output this is (None otherwise).
    """

    __slots__ = (
        "cmp",
        "feeds",
        "indicator",
        "kernels",
        "relu_of",
        "sites",
        "src",
        "tags",
        "vid",
        "zero",
    )

    def __init__(
        self,
        *,
        zero: bool = False,
        tags: frozenset = frozenset(),
        src: str | None = None,
        kernels: frozenset = frozenset(),
        feeds: frozenset = frozenset(),
        sites: frozenset = frozenset(),
        cmp: tuple[int, bool] | None = None,
    ):
        self.zero, self.tags, self.src = zero, tags, src
        self.kernels, self.feeds, self.sites, self.cmp = kernels, feeds, sites, cmp
        self.indicator, self.relu_of = False, None
        self.vid = next(_IDS)


# Value numbers: two equations of one walk that apply the same first-order primitive with the
# same params to the same values compute the same value (``jnp.where(x @ w > 0, x @ w, 0)``).
# Cleared at the start of each top-level walk (``reset_value_numbers``).
_NUMBERS: dict[Any, int] = {}


def reset_value_numbers() -> None:
    _NUMBERS.clear()


def _value_key(eqn: jex.JaxprEqn, infos: Sequence[Info]) -> Any:
    return _value_key_of(eqn, [info.vid for info in infos])


def _value_key_of(eqn: jex.JaxprEqn, vids: Sequence[int]) -> Any:
    args = []
    for atom, vid in zip(eqn.invars, vids, strict=True):
        if isinstance(atom, jex.Literal):
            args.append(("lit", repr(atom.val), str(atom.aval)))
        else:
            args.append(vid)
    try:
        params = repr(sorted(eqn.params.items()))
    except Exception:
        return None
    return eqn.primitive.name, tuple(args), params


def is_zero_const(value: Any) -> bool:
    """An all-zero numeric constant of any dtype (bfloat16 and fp8 included)."""
    try:
        arr = np.asarray(value)
    except Exception:  # a tracer closed over by the function: not a known constant
        return False
    if arr.size == 0 or arr.dtype == np.bool_:
        return False
    try:
        numeric = jnp.issubdtype(arr.dtype, jnp.number)
    except TypeError:
        return False
    return bool(numeric) and not np.any(arr != 0)


def is_float(atom: Any) -> bool:
    return jnp.issubdtype(atom.aval.dtype, jnp.floating)


def literal_info(atom: jex.Literal) -> Info:
    return Info(zero=is_zero_const(atom.val))


def const_infos(consts: Sequence[Any]) -> list[Info]:
    return [Info(zero=is_zero_const(c)) for c in consts]


def relu_operand(eqn: jex.JaxprEqn, infos: Sequence[Info]) -> tuple[int, str] | None:
    """``(index of z in eqn.invars, form)`` when ``eqn`` is a ReLU candidate, else None."""
    name = eqn.primitive.name
    if name == "max" and len(infos) == 2:
        a, b = infos
        if b.zero and not a.zero:
            i = 0
        elif a.zero and not b.zero:
            i = 1
        else:
            return None
        z = eqn.invars[i]
        return (i, "max") if not isinstance(z, jex.Literal) and is_float(z) else None
    if name == "select_n" and len(infos) == 3:
        pred, on_false, on_true = infos
        if pred.cmp is None or pred.indicator:
            return None
        vid, positive = pred.cmp
        if positive is True and on_false.zero and on_true.vid == vid:
            i = 2
        elif positive is False and on_true.zero and on_false.vid == vid:
            i = 1
        else:
            return None
        return (i, "select") if is_float(eqn.invars[i]) else None
    if name == "mul" and len(infos) == 2:
        for i, j in ((0, 1), (1, 0)):
            ind = infos[j]
            if ind.indicator and ind.cmp == (infos[i].vid, True) and is_float(eqn.invars[i]):
                return i, "mul"
        return None
    return None


def propagate(eqn: jex.JaxprEqn, infos: Sequence[Info]) -> list[Info]:
    """The :class:`Info` of each output of a first-order equation."""
    name = eqn.primitive.name
    tagged = [x for x in infos if x.tags]
    tags = frozenset().union(*(x.tags for x in infos))
    sites = frozenset().union(*(x.sites for x in infos))
    kernels = frozenset().union(*(x.kernels for x in tagged))
    feeds = frozenset().union(*(x.feeds for x in tagged))
    feeds |= {x.src for x in infos if not x.tags and x.src}
    src = None
    if name in _MIXING:
        if tagged:
            kernels = frozenset(x.src for x in infos if not x.tags and x.src)
            feeds, tags = kernels, frozenset({"dot"})
        else:
            tags = frozenset()
    elif name in _REDUCTIONS and tagged:
        axes = eqn.params.get("axes", ())
        ndim = len(getattr(eqn.invars[0].aval, "shape", ()))
        if ndim and (ndim - 1) in tuple(axes):
            tags = frozenset({"reduce"})
    if name in _SHAPE_OPS and infos:
        src = infos[0].src
    zero = name in _SHAPE_OPS and bool(infos) and infos[0].zero
    if name == "select_n" and len(infos) > 1 and all(x.zero for x in infos[1:]):
        zero = True
    out = [
        Info(zero=zero, tags=tags, src=src, kernels=kernels, feeds=feeds, sites=sites)
        for _ in eqn.outvars
    ]
    if len(out) == 1 and not eqn.effects:
        key = _value_key(eqn, infos)
        if key is not None:
            out[0].vid = _NUMBERS.setdefault(key, out[0].vid)
    cmp = _comparison(eqn, infos)
    if cmp is not None:
        out[0].cmp = cmp
    if name in _SHAPE_OPS and name != "convert_element_type" and infos and infos[0].cmp:
        # the same reshaping of "z > 0" is "z' > 0" of the same reshaping z' of z
        vid, positive = infos[0].cmp
        key = _value_key_of(eqn, [vid, *(x.vid for x in infos[1:])])
        if key is not None:
            out[0].cmp = (_NUMBERS.setdefault(key, next(_IDS)), positive)
            out[0].indicator = infos[0].indicator
    if name == "convert_element_type" and infos and infos[0].cmp is not None:
        if eqn.invars[0].aval.dtype == np.bool_:  # the float indicator of z > 0
            out[0].cmp, out[0].indicator = infos[0].cmp, True
    return out


def _comparison(eqn: jex.JaxprEqn, infos: Sequence[Info]) -> tuple[int, bool] | None:
    op = eqn.primitive.name
    if op not in _POSITIVE or len(infos) != 2:
        return None
    a, b = infos
    if b.zero and not a.zero and not isinstance(eqn.invars[0], jex.Literal):
        return a.vid, _POSITIVE[op]
    if a.zero and not b.zero and not isinstance(eqn.invars[1], jex.Literal):
        return b.vid, _POSITIVE[_MIRROR[op]]
    return None


def site_info(z: Info, site: int) -> Info:
    """The Info of a ReLU's output: that of ``z``, depending on the site too."""
    out = Info(tags=z.tags, kernels=z.kernels, feeds=z.feeds, sites=z.sites | {site})
    out.relu_of = site
    return out


def carry_info(infos: Sequence[Info]) -> Info:
    """A loop carry: nothing known but what any input could give it."""
    tagged = [x for x in infos if x.tags]
    return Info(
        tags=frozenset().union(*(x.tags for x in infos)),
        kernels=frozenset().union(*(x.kernels for x in tagged)),
        feeds=frozenset().union(*(x.feeds for x in tagged)),
        sites=frozenset().union(*(x.sites for x in infos)),
    )


def clipped_site(eqn: jex.JaxprEqn, infos: Sequence[Info]) -> int | None:
    """The candidate whose ReLU output ``eqn`` clips from above (``min(relu(z), hi)``)."""
    if eqn.primitive.name != "min" or len(infos) != 2:
        return None
    for i, j in ((0, 1), (1, 0)):
        if infos[i].relu_of is not None and not infos[j].tags and not infos[j].zero:
            return infos[i].relu_of
    return None


def sliced(info: Info) -> Info:
    """A scanned-over input's per-iteration slice: the same parameter / zero / dependence."""
    out = Info(
        zero=info.zero,
        tags=info.tags,
        src=info.src,
        kernels=info.kernels,
        feeds=info.feeds,
        sites=info.sites,
    )
    return out
