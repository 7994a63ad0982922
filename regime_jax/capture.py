"""Find every ReLU in any JAX function, with no edit to it: ``capture_relus(apply_fn)``.

The only module that touches JAX internals (jaxpr equations, primitive names and params,
source info). Tested on jax 0.10.2; the primitive names it relies on are listed below.

How it works. ``capture_relus(apply_fn)`` returns ``preacts_fn(params, x, **kw) -> (out,
preacts)``. Each call traces ``apply_fn`` to a jaxpr and evaluates that jaxpr again, equation
by equation, binding the very same primitives (so ``out`` is bit-identical to
``apply_fn(params, x, **kw)``), and keeps the input ``z`` of every ReLU it meets.

What counts as a ReLU:
  * ``max(z, 0)`` with a zero on either side: ``jnp.maximum(z, 0.)``, ``jnp.maximum(0., z)``,
    ``jnp.clip(z, 0)``, and ``jax.nn.relu`` (= ``flax.linen.relu`` = ``flax.nnx.relu``, whose
    body is ``jnp.maximum(z, 0)``). "Zero" is a literal 0, a broadcast / reshape / cast of
    one (``jnp.zeros_like(z)``), or an all-zero constant.
  * Not the clamps that libraries write with ``max(., 0)`` but that are no ReLU: the variance
    clamp of flax's LayerNorm / GroupNorm / BatchNorm (``_compute_stats``) and every
    ``jax.nn`` function other than ``relu`` (``relu6`` and ``hard_tanh`` have a second kink,
    ``standardize`` clamps a variance). ``jnp.where(z > 0, z, 0)`` is not recognised.

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
    Without a ReLU inside they are evaluated unchanged.
  * Any other primitive that holds a sub-computation with a ReLU inside is refused, naming
    the primitive and the jax version; one without a ReLU inside is evaluated unchanged.
    ReLUs are never skipped silently.

Names. A pre-activation is named by the path of the module that produced it: the JAX name
stack of the equation that computed ``z`` (linen pushes every module's path; ``nn.Dense(4,
name="a")`` gives ``a``, a Dense ``fc1`` inside ``block0/ffn`` gives ``block0/ffn/fc1``).
The leading component shared by every named equation of the function (linen's root module
class, e.g. ``MLP``) is dropped. Where there is no name (NNX, plain JAX, or ``z`` computed
in the root scope) the name is ``relu_<k>``, ``k`` the ReLU's index in trace order (counting
every ReLU). A name taken by an earlier ReLU gets ``#<n>`` appended (``fc1#1``). Names depend
only on the function, never on the values: every trace gives the same names.

>>> import jax, jax.numpy as jnp
>>> def apply_fn(params, x):
...     return jnp.maximum(x @ params["w"], 0.0) @ params["v"]
>>> params = {"w": jnp.ones((3, 4)), "v": jnp.ones((4, 2))}
>>> out, preacts = capture_relus(apply_fn)(params, jnp.ones((5, 3)))
>>> {k: z.shape for k, z in preacts.items()}
{'relu_0': (5, 4)}
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import numpy as np

__all__ = ["CaptureError", "PreactsFn", "capture_relus"]

PreactsFn = Callable[..., tuple[Any, dict[str, jax.Array]]]


class CaptureError(ValueError):
    """A function whose ReLUs cannot be captured (none found, or inside a refused construct)."""


# ------------------------------------------------------------------ primitive tables (jax 0.10)
_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call"})
_CUSTOM = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
_REMAT = frozenset({"remat2", "checkpoint", "remat"})
_SCAN = frozenset({"scan"})
_REFUSED = {
    "cond": "lax.cond / lax.switch",
    "while": "lax.while_loop / lax.fori_loop",
}
# Equations that pass an all-zero operand on unchanged (for the "is it a zero?" test).
_ZERO_PRESERVING = frozenset(
    {"broadcast_in_dim", "convert_element_type", "reshape", "squeeze", "expand_dims", "copy"}
)
_WHAT_IS_RECOGNISED = (
    "recognised: jax.nn.relu / flax.linen.relu / flax.nnx.relu, jnp.maximum(z, 0) with the "
    "zero on either side, jnp.clip(z, 0)"
)


def _jaxpr_of(value: Any) -> tuple[jex.Jaxpr, Sequence[Any]] | None:
    if isinstance(value, jex.ClosedJaxpr):
        return value.jaxpr, value.consts
    if isinstance(value, jex.Jaxpr):
        return value, ()
    return None


def _subjaxprs(params: dict[str, Any]) -> list[tuple[jex.Jaxpr, Sequence[Any]]]:
    out = []
    for value in params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            found = _jaxpr_of(item)
            if found is not None:
                out.append(found)
    return out


def _is_zero_const(value: Any) -> bool:
    try:
        arr = np.asarray(value)
    except Exception:  # a tracer closed over by the function: not a known constant
        return False
    return arr.size > 0 and np.issubdtype(arr.dtype, np.number) and not np.any(arr)


def _zero_vars(jaxpr: jex.Jaxpr, consts: Sequence[Any]) -> set:
    """Variables of ``jaxpr`` known to hold only zeros."""
    zeros = {v for v, c in zip(jaxpr.constvars, consts, strict=True) if _is_zero_const(c)}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _ZERO_PRESERVING and eqn.invars:
            if _is_zero_atom(eqn.invars[0], zeros):
                zeros.add(eqn.outvars[0])
    return zeros


def _is_zero_atom(atom: Any, zeros: set) -> bool:
    if isinstance(atom, jex.Literal):
        return _is_zero_const(atom.val)
    return atom in zeros


def _library_clamp(eqn: jex.JaxprEqn) -> bool:
    """True for a ``max(., 0)`` written inside a library function that is not a ReLU."""
    traceback = eqn.source_info.traceback
    for frame in traceback.frames if traceback is not None else ():
        path = frame.file_name.replace("\\", "/")
        if path.endswith("jax/_src/nn/functions.py"):
            return frame.function_name != "relu"
        if "/flax/" in path and path.endswith("normalization.py"):
            return True
    return False


def _relu_operand(eqn: jex.JaxprEqn, zeros: set) -> Any | None:
    """The ``z`` of a ``max(z, 0)`` equation that is a ReLU, else None."""
    if eqn.primitive.name != "max" or len(eqn.invars) != 2:
        return None
    a, b = eqn.invars
    if _is_zero_atom(b, zeros) and not _is_zero_atom(a, zeros):
        z = a
    elif _is_zero_atom(a, zeros) and not _is_zero_atom(b, zeros):
        z = b
    else:
        return None
    if isinstance(z, jex.Literal) or not np.issubdtype(z.aval.dtype, np.floating):
        return None
    return None if _library_clamp(eqn) else z


def _has_relu(jaxpr: jex.Jaxpr, consts: Sequence[Any]) -> bool:
    zeros = _zero_vars(jaxpr, consts)
    for eqn in jaxpr.eqns:
        if _relu_operand(eqn, zeros) is not None:
            return True
        if any(_has_relu(j, c) for j, c in _subjaxprs(eqn.params)):
            return True
    return False


# ------------------------------------------------------------------ names
_TRANSFORM = re.compile(r"\w+\(|\)")


def _scope(outer: str, eqn: jex.JaxprEqn) -> str:
    inner = _TRANSFORM.sub("", str(eqn.source_info.name_stack))
    return "/".join(p for p in (*outer.split("/"), *inner.split("/")) if p)


class _Recorder:
    """Pre-activations in trace order: (scope, site index, iteration suffix, value)."""

    def __init__(self, counter: list[int]):
        self.counter = counter  # shared with nested recorders: one site index per ReLU
        self.entries: list[tuple[str, int, str, Any]] = []

    def add(self, scope: str, value: Any) -> None:
        self.entries.append((scope, self.counter[0], "", value))
        self.counter[0] += 1


def _eval(
    jaxpr: jex.Jaxpr,
    consts: Sequence[Any],
    args: Sequence[Any],
    arg_scopes: Sequence[str],
    outer: str,
    rec: _Recorder,
) -> tuple[list[Any], list[str]]:
    """Evaluates ``jaxpr`` like ``jax.core.eval_jaxpr`` and records each ReLU's input.

    Also returns, per output, the scope of the equation that produced it (the name a ReLU
    of that value gets).
    """
    env: dict[Any, Any] = {}
    scopes: dict[Any, str] = {}
    zeros = _zero_vars(jaxpr, consts)
    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v], scopes[v] = c, ""
    for v, a, s in zip(jaxpr.invars, args, arg_scopes, strict=True):
        env[v], scopes[v] = a, s

    def read(atom):
        return atom.val if isinstance(atom, jex.Literal) else env[atom]

    def scope_of(atom):
        return "" if isinstance(atom, jex.Literal) else scopes[atom]

    for eqn in jaxpr.eqns:
        invals = [read(a) for a in eqn.invars]
        here = _scope(outer, eqn)
        z = _relu_operand(eqn, zeros)
        if z is not None:
            rec.add(scope_of(z), read(z))
        subs = _subjaxprs(eqn.params)
        if subs and any(_has_relu(j, c) for j, c in subs):
            in_scopes = [scope_of(a) for a in eqn.invars]
            outs = _eval_higher_order(eqn, invals, in_scopes, here, rec)
        else:
            outs = _bind(eqn, invals, here)
        outs = outs if eqn.primitive.multiple_results else [outs]
        for v, val in zip(eqn.outvars, outs, strict=True):
            env[v], scopes[v] = val, here
    return [read(a) for a in jaxpr.outvars], [scope_of(a) for a in jaxpr.outvars]


def _bind(eqn: jex.JaxprEqn, invals: Sequence[Any], scope: str) -> Any:
    params = eqn.primitive.get_bind_params(eqn.params)
    with jax.named_scope(scope) if scope else contextlib.nullcontext(), eqn.ctx.manager:
        return eqn.primitive.bind(*invals, **params)


def _eval_higher_order(eqn, invals, in_scopes, scope, rec: _Recorder) -> list[Any]:
    name = eqn.primitive.name
    if name in _INLINE:
        sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        jaxpr, consts = _jaxpr_of(sub)
        return _eval(jaxpr, consts, invals, in_scopes, scope, rec)[0]
    if name in _CUSTOM:
        jaxpr, consts = _jaxpr_of(eqn.params["call_jaxpr"])
        _eval(jaxpr, consts, invals, in_scopes, scope, rec)  # for the pre-activations only
        return _bind(eqn, invals, scope)  # output (and derivative rule) of the original call
    if name in _REMAT:
        return _eval_remat(eqn, invals, in_scopes, scope, rec)
    if name in _SCAN:
        return _eval_scan(eqn, invals, in_scopes, scope, rec)
    if name in _REFUSED:
        raise CaptureError(
            f"a ReLU inside {_REFUSED[name]} (primitive {name!r}) cannot be captured: which "
            f"branch runs, or how many iterations, is decided at run time, so the set of "
            f"units is not fixed. Move the ReLU out of the {_REFUSED[name]}, or use "
            f"jnp.where / lax.scan (a fori_loop with static bounds) instead."
        )
    raise CaptureError(
        f"primitive {name!r} holds a sub-computation with a ReLU inside, and capture_relus "
        f"does not know how to look into it (jax {jax.__version__}); its ReLUs would be "
        f"skipped, so the function is refused. Supported: jit, custom_jvp/custom_vjp, "
        f"checkpoint/remat, scan."
    )


def _eval_remat(eqn, invals, in_scopes, scope, rec: _Recorder) -> list[Any]:
    jaxpr, consts = _jaxpr_of(eqn.params["jaxpr"])
    inner: list[_Recorder] = []

    def body(*args):
        sub = _Recorder([rec.counter[0]])
        outs, _ = _eval(jaxpr, consts, args, in_scopes, scope, sub)
        inner[:] = [sub]
        return outs, [e[3] for e in sub.entries]

    wrapped = jax.checkpoint(
        body, prevent_cse=eqn.params.get("prevent_cse", True), policy=eqn.params.get("policy")
    )
    outs, values = wrapped(*invals)
    _merge(rec, inner[0], values, stacked=0)
    return list(outs)


def _eval_scan(eqn, invals, in_scopes, scope, rec: _Recorder) -> list[Any]:
    p = eqn.params
    jaxpr, consts = _jaxpr_of(p["jaxpr"])
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    const_vals = invals[:n_consts]
    carry0, xs = invals[n_consts : n_consts + n_carry], invals[n_consts + n_carry :]
    inner: list[_Recorder] = []

    def body(carry, x):
        sub = _Recorder([rec.counter[0]])
        outs, _ = _eval(jaxpr, consts, [*const_vals, *carry, *x], in_scopes, scope, sub)
        inner[:] = [sub]
        return outs[:n_carry], (outs[n_carry:], [e[3] for e in sub.entries])

    carry, (ys, values) = jax.lax.scan(
        body, list(carry0), list(xs), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    _merge(rec, inner[0], values, stacked=p["length"])
    return [*carry, *ys]


def _merge(rec: _Recorder, sub: _Recorder, values: Sequence[Any], stacked: int) -> None:
    """Moves a nested recorder's entries into ``rec`` (split per iteration if ``stacked``)."""
    for (scope, site, suffix, _), value in zip(sub.entries, values, strict=True):
        if stacked:
            for i in range(stacked):
                rec.entries.append((scope, site, f"[{i}]{suffix}", value[i]))
        else:
            rec.entries.append((scope, site, suffix, value))
    rec.counter[0] = max(rec.counter[0], sub.counter[0])


# ------------------------------------------------------------------ public


def _root(jaxpr: jex.Jaxpr) -> str:
    """The leading scope component shared by every named equation ('' if none)."""
    firsts = {_TRANSFORM.sub("", str(e.source_info.name_stack)).split("/")[0] for e in jaxpr.eqns}
    firsts.discard("")
    return firsts.pop() if len(firsts) == 1 else ""


def _names(entries: Sequence[tuple[str, int, str, Any]], root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scope, site, suffix, value in entries:
        parts = scope.split("/") if scope else []
        if root and parts and parts[0] == root:
            parts = parts[1:]
        name = ("/".join(parts) or f"relu_{site}") + suffix
        if name in out:
            n = 1
            while f"{name}#{n}" in out:
                n += 1
            name = f"{name}#{n}"
        out[name] = value
    return out


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Array-valued keyword arguments are traced; the rest (``train=False``) stay static."""
    dynamic, static = {}, {}
    for k, v in kwargs.items():
        leaves = jax.tree.leaves(v)
        is_array = leaves and all(isinstance(leaf, jax.Array | np.ndarray) for leaf in leaves)
        (dynamic if is_array else static)[k] = v
    return dynamic, static


def _check_callable(apply_fn: Any) -> None:
    """A module object is not ``apply_fn(params, x)``: say which function to pass instead."""
    kind = type(apply_fn).__module__ or ""
    if kind.startswith("flax.") or any(
        c.__module__.startswith("flax.") for c in type(apply_fn).__mro__[1:-1]
    ):
        if hasattr(apply_fn, "apply"):  # linen
            raise TypeError("capture_relus takes apply_fn(params, x): pass model.apply")
        raise TypeError(
            "capture_relus takes apply_fn(params, x): for an NNX module pass "
            "rj.nnx_apply(module)[0] (with params = rj.nnx_apply(module)[1])"
        )
    if not callable(apply_fn):
        raise TypeError(f"capture_relus takes a function apply_fn(params, x), got {apply_fn!r}")


def capture_relus(apply_fn: Callable[..., Any]) -> PreactsFn:
    """Wraps ``apply_fn`` so that it also returns the pre-activation of every ReLU it applies.

    Args:
      apply_fn: ``apply_fn(params, x, **kw) -> out``, any JAX-traceable function, left as
        its author wrote it (a linen ``model.apply`` with variables, an NNX forward through
        ``nnx.merge``, plain JAX).

    Returns:
      ``preacts_fn(params, x, **kw) -> (out, preacts)``: ``out`` is bit-identical to
      ``apply_fn(params, x, **kw)``; ``preacts`` maps each ReLU's name (module docstring) to
      its pre-activation ``z`` (units on the last axis), in trace order. A unit is on iff
      ``z > 0``. Pure and jit-able; keyword arguments pass through (array values are traced,
      others are static).

    Raises:
      CaptureError: (a ValueError) when tracing finds no ReLU, or a ReLU inside a construct
        that cannot be captured (``lax.cond``, ``lax.while_loop``, an unknown primitive).

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

    _check_callable(apply_fn)

    def preacts_fn(params: Any, x: Any, **kwargs: Any) -> tuple[Any, dict[str, jax.Array]]:
        dynamic, static = _split_kwargs(kwargs)

        def flat_fn(params, x, dynamic):
            return apply_fn(params, x, **dynamic, **static)

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(params, x, dynamic)
        if not _has_relu(closed.jaxpr, closed.consts):
            raise CaptureError(
                f"no ReLU found in {getattr(apply_fn, '__qualname__', apply_fn)!r}: activation "
                f"patterns are defined for ReLU units only ({_WHAT_IS_RECOGNISED})"
            )
        flat_args = jax.tree.leaves((params, x, dynamic))
        rec = _Recorder([0])
        outs, _ = _eval(closed.jaxpr, closed.consts, flat_args, [""] * len(flat_args), "", rec)
        out = jax.tree.unflatten(jax.tree.structure(out_shape), outs)
        return out, _names(rec.entries, _root(closed.jaxpr))

    preacts_fn.__wrapped__ = apply_fn  # type: ignore[attr-defined]
    return preacts_fn
