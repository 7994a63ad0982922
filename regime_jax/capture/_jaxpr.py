"""The jaxpr interpreter behind :mod:`regime_jax.capture` (private: the JAX internals live here).

:func:`evaluate` runs a jaxpr equation by equation, binding the same primitives, for one or
two *streams* at once. Every value in its environment is a tuple with one entry per stream:

* one stream (``capture_relus``): the function itself; each ReLU's input is recorded.
* two streams (``gate_relus``): ``(values, gates)``, evaluated in lockstep through the same
  equations. At a ReLU with inputs ``(z_v, z_g)`` the gate stream takes the ReLU as written,
  ``h_g = max(z_g, 0)``, and the value stream is gated by it:
  ``h_v = where(z_g > 0, z_v, h_g)``. Where the gate is off ``h_g`` is 0 (``where(z_g > 0,
  z_v, 0)``, the gated unit), except for a NaN gate, which stays NaN. So with ``z_g``
  bit-equal to ``z_v`` (gates == values) ``h_v`` is bit-identical to ``max(z_v, 0)`` for
  every input, -0.0 and NaN included, on every backend.

An equation whose inputs are the very same objects in every stream (it reads only shared
inputs, literals or constants) is bound once and its result shared: both streams see the
same dropout mask, and work on the inputs alone is not done twice.

Tested on jax 0.10.2; the primitive names it relies on are in the tables below.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from regime_jax import bitmask

Streams = tuple[Any, ...]  # one value per stream


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
WHAT_IS_RECOGNISED = (
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


def has_relu(jaxpr: jex.Jaxpr, consts: Sequence[Any]) -> bool:
    """Whether ``jaxpr`` (or any sub-computation of it) applies a ReLU."""
    zeros = _zero_vars(jaxpr, consts)
    for eqn in jaxpr.eqns:
        if _relu_operand(eqn, zeros) is not None:
            return True
        if any(has_relu(j, c) for j, c in _subjaxprs(eqn.params)):
            return True
    return False


# ------------------------------------------------------------------ names
_TRANSFORM = re.compile(r"\w+\(|\)")


def _scope(outer: str, eqn: jex.JaxprEqn) -> str:
    inner = _TRANSFORM.sub("", str(eqn.source_info.name_stack))
    return "/".join(p for p in (*outer.split("/"), *inner.split("/")) if p)


def root(jaxpr: jex.Jaxpr) -> str:
    """The leading scope component shared by every named equation ('' if none)."""
    firsts = {_TRANSFORM.sub("", str(e.source_info.name_stack)).split("/")[0] for e in jaxpr.eqns}
    firsts.discard("")
    return firsts.pop() if len(firsts) == 1 else ""


def names(entries: Sequence[tuple[str, int, str, Any]], root: str) -> dict[str, Any]:
    """``{name: value}`` from a recorder's entries (the naming rule of the capture docstring)."""
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


class Recorder:
    """Pre-activations in trace order: (scope, site index, iteration suffix, per-stream z)."""

    def __init__(self, counter: list[int], streams: int):
        self.counter = counter  # shared with nested recorders: one site index per ReLU
        self.streams = streams  # 1: capture; 2: (values, gates)
        self.entries: list[tuple[str, int, str, Streams]] = []

    def add(self, scope: str, zs: Streams) -> None:
        self.entries.append((scope, self.counter[0], "", zs))
        self.counter[0] += 1

    def nested(self) -> Recorder:
        return Recorder([self.counter[0]], self.streams)


# ------------------------------------------------------------------ the interpreter
def evaluate(
    jaxpr: jex.Jaxpr,
    consts: Sequence[Any],
    args: Sequence[Streams],
    arg_scopes: Sequence[str],
    outer: str,
    rec: Recorder,
) -> tuple[list[Streams], list[str]]:
    """Evaluates ``jaxpr`` like ``jax.core.eval_jaxpr``, per stream, recording each ReLU's input.

    ``args`` holds one tuple per input variable, one value per stream. Also returns, per
    output, the scope of the equation that produced it (the name a ReLU of that value gets).
    """
    k = rec.streams
    env: dict[Any, Streams] = {}
    scopes: dict[Any, str] = {}
    zeros = _zero_vars(jaxpr, consts)
    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v], scopes[v] = (c,) * k, ""
    for v, a, s in zip(jaxpr.invars, args, arg_scopes, strict=True):
        env[v], scopes[v] = tuple(a), s

    def read(atom) -> Streams:
        return (atom.val,) * k if isinstance(atom, jex.Literal) else env[atom]

    def scope_of(atom) -> str:
        return "" if isinstance(atom, jex.Literal) else scopes[atom]

    for eqn in jaxpr.eqns:
        invals = [read(a) for a in eqn.invars]
        here = _scope(outer, eqn)
        z = _relu_operand(eqn, zeros)
        subs = _subjaxprs(eqn.params)
        if z is not None:
            rec.add(scope_of(z), read(z))
            outs = _relu(eqn, invals, read(z), here, k)
        elif subs and any(has_relu(j, c) for j, c in subs):
            in_scopes = [scope_of(a) for a in eqn.invars]
            outs = _eval_higher_order(eqn, invals, in_scopes, here, rec)
        else:
            outs = _bind_streams(eqn, invals, here, k)
        for v, val in zip(eqn.outvars, outs, strict=True):
            env[v], scopes[v] = val, here
    return [read(a) for a in jaxpr.outvars], [scope_of(a) for a in jaxpr.outvars]


def _bind(eqn: jex.JaxprEqn, invals: Sequence[Any], scope: str) -> list[Any]:
    params = eqn.primitive.get_bind_params(eqn.params)
    with jax.named_scope(scope) if scope else contextlib.nullcontext(), eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _shared(invals: Sequence[Streams]) -> bool:
    return all(all(x is s[0] for x in s[1:]) for s in invals)


def _bind_streams(eqn, invals: Sequence[Streams], scope: str, k: int) -> list[Streams]:
    """Binds ``eqn`` in every stream (once, shared, when its inputs are shared)."""
    if _shared(invals):
        return [(o,) * k for o in _bind(eqn, [s[0] for s in invals], scope)]
    per_stream = [_bind(eqn, [s[i] for s in invals], scope) for i in range(k)]
    return [tuple(outs) for outs in zip(*per_stream, strict=True)]


def _relu(eqn, invals: Sequence[Streams], zs: Streams, scope: str, k: int) -> list[Streams]:
    if k == 1 or _shared([zs]):
        return _bind_streams(eqn, invals, scope, k)
    z_v, z_g = zs
    (h_g,) = _bind(eqn, [s[1] for s in invals], scope)  # the gate network's own ReLU
    with jax.named_scope(scope) if scope else contextlib.nullcontext():
        h_v = jnp.where(bitmask.active(z_g), z_v, h_g)  # h_g is 0 (or a NaN gate) where off
    return [(h_v, h_g)]


def _eval_higher_order(eqn, invals, in_scopes, scope, rec: Recorder) -> list[Streams]:
    name = eqn.primitive.name
    if name in _INLINE:
        sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        jaxpr, consts = _jaxpr_of(sub)
        return evaluate(jaxpr, consts, invals, in_scopes, scope, rec)[0]
    if name in _CUSTOM:
        jaxpr, consts = _jaxpr_of(eqn.params["call_jaxpr"])
        outs, _ = evaluate(jaxpr, consts, invals, in_scopes, scope, rec)
        if rec.streams == 2:  # the value stream is gated: the body, not the custom rule
            return outs
        # capture: the output (and derivative rule) of the original call
        return _bind_streams(eqn, invals, scope, rec.streams)
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
        f"primitive {name!r} holds a sub-computation with a ReLU inside, and regime_jax.capture "
        f"does not know how to look into it (jax {jax.__version__}); its ReLUs would be "
        f"skipped, so the function is refused. Supported: jit, custom_jvp/custom_vjp, "
        f"checkpoint/remat, scan."
    )


def _flatten(invals: Sequence[Streams]) -> tuple[list[Any], Callable[[Sequence[Any]], list]]:
    """Streams -> flat list (a shared value once), and the inverse, for a traced body."""
    shared = [all(x is s[0] for x in s[1:]) for s in invals]
    flat = [x for s, sh in zip(invals, shared, strict=True) for x in (s[:1] if sh else s)]

    def unflatten(leaves: Sequence[Any]) -> list[Streams]:
        out, i = [], 0
        for s, sh in zip(invals, shared, strict=True):
            n = 1 if sh else len(s)
            out.append(tuple(leaves[i : i + n]) * (len(s) if sh else 1))
            i += n
        return out

    return flat, unflatten


def _eval_remat(eqn, invals, in_scopes, scope, rec: Recorder) -> list[Streams]:
    jaxpr, consts = _jaxpr_of(eqn.params["jaxpr"])
    flat, unflatten = _flatten(invals)
    inner: list[Recorder] = []

    def body(*args):
        sub = rec.nested()
        outs, _ = evaluate(jaxpr, consts, unflatten(args), in_scopes, scope, sub)
        inner[:] = [sub]
        return outs, [e[3] for e in sub.entries]

    wrapped = jax.checkpoint(
        body, prevent_cse=eqn.params.get("prevent_cse", True), policy=eqn.params.get("policy")
    )
    outs, values = wrapped(*flat)
    _merge(rec, inner[0], values, stacked=0)
    return [tuple(o) for o in outs]


def _eval_scan(eqn, invals, in_scopes, scope, rec: Recorder) -> list[Streams]:
    p = eqn.params
    jaxpr, consts = _jaxpr_of(p["jaxpr"])
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    const_vals = invals[:n_consts]
    carry0 = [tuple(c) for c in invals[n_consts : n_consts + n_carry]]  # one leaf per stream
    xs_flat, unflatten_xs = _flatten(invals[n_consts + n_carry :])
    inner: list[Recorder] = []

    def body(carry, x_flat):
        sub = rec.nested()
        args = [*const_vals, *carry, *unflatten_xs(x_flat)]
        outs, _ = evaluate(jaxpr, consts, args, in_scopes, scope, sub)
        inner[:] = [sub]
        return outs[:n_carry], (outs[n_carry:], [e[3] for e in sub.entries])

    carry, (ys, values) = jax.lax.scan(
        body, carry0, xs_flat, length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    _merge(rec, inner[0], values, stacked=p["length"])
    return [tuple(o) for o in (*carry, *ys)]


def _merge(rec: Recorder, sub: Recorder, values: Sequence[Streams], stacked: int) -> None:
    """Moves a nested recorder's entries into ``rec`` (split per iteration if ``stacked``)."""
    for (scope, site, suffix, _), zs in zip(sub.entries, values, strict=True):
        if stacked:
            for i in range(stacked):
                rec.entries.append((scope, site, f"[{i}]{suffix}", tuple(z[i] for z in zs)))
        else:
            rec.entries.append((scope, site, suffix, tuple(zs)))
    rec.counter[0] = max(rec.counter[0], sub.counter[0])
