"""Sign patterns beyond ReLU (private): which ``jax.nn`` activations can be opted in, how
their calls show in a jaxpr, and their decoupled (gated) form.

Recorded bit: ``z > 0`` of the function's input ``z``, as for ReLU. For every function here
``f(z) > 0 <=> z > 0`` (leaky_relu with a positive slope, elu with a positive alpha, gelu,
silu), so the bit is also the sign of the output.

How a call shows in a jaxpr (jax 0.10): ``jax.nn.silu`` (= ``swish``), ``leaky_relu`` and
``elu`` are ``jit`` equations named after the function; ``jax.nn.gelu`` is not jitted: its
equations are inlined, each carrying a ``jax/_src/nn/functions.py`` frame of ``gelu``
(``approximate=True``: ``x * 0.5 * (1 + tanh(...))``; ``False``: ``0.5 * x * erfc(-x / sqrt 2)``).
flax's ``nn.gelu`` / ``nn.silu`` / ``nn.swish`` are these very functions.

Decoupled form (gate freezing). Each variable of the function's body is classified by how
it depends on ``z``: ``C`` not at all, ``L`` linearly (``z``, ``-z``, ``c * z``), ``G``
nonlinearly (the gate's side: ``tanh(...)``, ``z > 0``), ``P`` a gated product (``L * G``,
``select(G, L, L)``, then scaled). The value stream computes ``L`` and ``P`` variables from
``z_values``, reading every ``G`` variable from the gate stream, so ``gelu`` becomes
``z_v * Phi(z_g)``, ``silu`` ``z_v * sigmoid(z_g)``, ``leaky_relu`` ``where(z_g >= 0, z_v,
slope * z_v)``: the same operations in the same order, so with ``z_g`` bit-equal to ``z_v``
the result is ``f(z_v)`` bit for bit. A body that does not end in ``P`` (``elu``: its
negative branch ``expm1(z)`` is no product with ``z``) cannot be decoupled and is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax.extend.core as jex

RELU = "relu"
ALIASES = {"swish": "silu"}  # jax.nn.swish is jax.nn.silu
ACTIVATIONS = ("relu", "leaky_relu", "gelu", "silu", "swish", "elu")
DEFAULT = ("relu",)
_JITTED = frozenset({"silu", "leaky_relu", "elu"})
_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call"})
_LINEAR_UNARY = frozenset({"neg", "copy", "copy_p", "convert_element_type"})
C, L, G, P = "C", "L", "G", "P"


class NotDecoupled(ValueError):
    """A body whose decoupled form is not ``z_values`` times a function of ``z_gates``."""


def normalise(activations: Any, field: str = "activations") -> frozenset:
    """The opted-in function names (aliases resolved); one-line ValueError for a bad one."""
    if isinstance(activations, str) or not isinstance(activations, Sequence) or not activations:
        raise ValueError(
            f"{field} must be a non-empty tuple of names from {list(ACTIVATIONS)}, "
            f"got {activations!r}"
        )
    for name in activations:
        if name not in ACTIVATIONS:
            raise ValueError(
                f"{field}: {name!r} is not recorded; allowed values: {list(ACTIVATIONS)}"
            )
    return frozenset(ALIASES.get(n, n) for n in activations)


class Call(NamedTuple):
    """One opted-in activation call: ``eqns[start:stop]`` of the current jaxpr."""

    fn: str
    stop: int
    z: Any  # the input variable
    out: Any  # the output variable
    body: list  # the equations to evaluate (a jitted call: its body), inputs ``invars``
    invars: list  # the body's input variables (``[z]`` or the jit body's own invar)
    consts: tuple[Sequence[Any], Sequence[Any]]  # the body's (constvars, values)
    body_out: Any  # the body's output variable
    spelling: str


def _fn_frames(eqn: jex.JaxprEqn) -> tuple[str | None, tuple]:
    """The ``jax.nn`` function an equation was traced in, and its frames outside ``jax``."""
    tb = eqn.source_info.traceback
    frames = list(tb.frames) if tb is not None else []
    fn = None
    for f in frames:
        if f.file_name.replace("\\", "/").endswith("jax/_src/nn/functions.py"):
            fn = f.function_name
            break
    outer = tuple(
        (f.file_name, f.line_num) for f in frames if "/jax/" not in f.file_name.replace("\\", "/")
    )
    return fn, outer


def _body_fn(jaxpr: jex.Jaxpr) -> str | None:
    for eqn in jaxpr.eqns:
        fn, _ = _fn_frames(eqn)
        if fn is not None:
            return fn
    return None


def match(eqns: Sequence[jex.JaxprEqn], i: int, acts: frozenset, later_reads: Callable) -> Any:
    """The opted-in activation call starting at ``eqns[i]`` (None if none starts there).

    ``later_reads(stop)``: the variables read by ``eqns[stop:]`` and the jaxpr's outputs.
    Raises NotDecoupled when an opted-in ``gelu`` is there but cannot be parsed.
    """
    eqn = eqns[i]
    name = eqn.primitive.name
    if name in _INLINE and eqn.params.get("name") in _JITTED & acts:
        closed = eqn.params.get("jaxpr")
        inner = getattr(closed, "jaxpr", closed)
        if (
            len(eqn.invars) == 1
            and len(eqn.outvars) == 1
            and isinstance(eqn.invars[0], jex.Var)
            and _body_fn(inner) == eqn.params["name"]
        ):
            fn = eqn.params["name"]
            return Call(
                fn,
                i + 1,
                eqn.invars[0],
                eqn.outvars[0],
                list(inner.eqns),
                list(inner.invars),
                (list(inner.constvars), list(getattr(closed, "consts", ()))),
                inner.outvars[0],
                f"jax.nn.{fn}",
            )
        return None
    fn, outer = _fn_frames(eqn)
    if fn != "gelu" or "gelu" not in acts:
        return None
    stop = i
    while stop < len(eqns) and _fn_frames(eqns[stop]) == (fn, outer):
        stop += 1
    body = list(eqns[i:stop])
    defined = {v for e in body for v in e.outvars}
    external = {a for e in body for a in e.invars if isinstance(a, jex.Var) and a not in defined}
    out = body[-1].outvars[0]
    leaked = (defined - {out}) & later_reads(stop)
    if len(external) != 1 or leaked or len(body[-1].outvars) != 1:
        raise NotDecoupled(
            f"a jax.nn.gelu traced as {len(body)} equations reading {len(external)} outer "
            f"values could not be parsed as one call (two GELUs applied back to back on one "
            f"line?); apply them on separate lines"
        )
    (z,) = external
    classes = classify(body, [z])
    if classes.get(out) != P:
        raise NotDecoupled(
            "a jax.nn.gelu whose equations are not z * g(z) (two GELUs applied back to back "
            "on one line?); apply them on separate lines"
        )
    tanh = any(e.primitive.name == "tanh" for e in body)
    spelling = "jax.nn.gelu" + ("" if tanh else "(approximate=False)")
    return Call(fn, stop, z, out, body, [z], ([], []), out, spelling)


def _class(atom: Any, classes: dict) -> str:
    return C if isinstance(atom, jex.Literal) else classes.get(atom, C)


def _sub(eqn: jex.JaxprEqn) -> tuple[Any, Sequence[Any]] | None:
    if eqn.primitive.name not in _INLINE:
        return None
    closed = eqn.params.get("jaxpr")
    if isinstance(closed, jex.ClosedJaxpr):
        return closed.jaxpr, closed.consts
    return (closed, ()) if isinstance(closed, jex.Jaxpr) else None


def _eqn_class(eqn: jex.JaxprEqn, cin: list[str]) -> str:
    kinds = set(cin)
    if kinds <= {C}:
        return C
    prim = eqn.primitive.name
    if prim in _LINEAR_UNARY and len(cin) == 1:
        return cin[0]
    if prim in ("mul", "div") and len(cin) == 2:
        a, b = cin
        if prim == "mul" and C in cin and kinds & {L, P}:
            return (kinds - {C}).pop()
        if prim == "div" and b == C and a in (L, P):
            return a
        if prim == "mul" and kinds == {L, G}:
            return P
    if prim == "select_n":
        pred, cases = cin[0], set(cin[1:])
        if pred in (C, G) and cases & {L, P} and cases <= {L, P, C}:
            return P
    if kinds & {P}:
        raise NotDecoupled(
            f"its body applies {prim} to the gated product, so it is not z_values times a "
            f"function of z_gates"
        )
    if prim == "select_n" and kinds & {L} and kinds & {G}:
        raise NotDecoupled(
            "it selects between a branch linear in z and a nonlinear one (elu's expm1), so "
            "it is not z_values times a function of z_gates"
        )
    return G


def classify(body: Sequence[jex.JaxprEqn], invars: Sequence[Any], classes=None) -> dict:
    """Each variable's class (C / L / G / P, module docstring), inputs being ``L``."""
    classes = {} if classes is None else classes
    for v in invars:
        classes.setdefault(v, L)
    for eqn in body:
        cin = [_class(a, classes) for a in eqn.invars]
        sub = _sub(eqn)
        if sub is not None:
            inner, _ = sub
            inner_cls = {v: c for v, c in zip(inner.invars, cin, strict=True)}
            classify(inner.eqns, [], inner_cls)
            for v, a in zip(eqn.outvars, inner.outvars, strict=True):
                classes[v] = _class(a, inner_cls)
            continue
        out = _eqn_class(eqn, cin)
        for v in eqn.outvars:
            classes[v] = out
    return classes


def run_gated(call: Call, z_v: Any, z_g: Any, bind: Callable) -> tuple[Any, Any]:
    """``(h_values, h_gates)`` of a call in decoupled form (module docstring); raises
    NotDecoupled if it has none. ``bind(eqn, invals)`` binds one equation."""
    body, invars, outvar = call.body, call.invars, call.body_out
    consts_vars, consts_vals = call.consts
    classes = {v: C for v in consts_vars}
    classes = classify(body, invars, classes)
    if _class(outvar, classes) != P:
        raise NotDecoupled("its output is not a gated product of z")
    env_g = {**dict(zip(consts_vars, consts_vals, strict=True)), **{v: z_g for v in invars}}
    env_v = {v: z_v for v in invars}
    _run(body, env_g, env_v, classes, bind)
    return env_v[outvar], env_g[outvar]


def _run(body, env_g: dict, env_v: dict, classes: dict, bind: Callable) -> None:
    def read(env, a):
        return a.val if isinstance(a, jex.Literal) else env[a]

    for eqn in body:
        sub = _sub(eqn)
        if sub is not None:
            inner, consts = sub
            g_in = [read(env_g, a) for a in eqn.invars]
            sub_g = {**dict(zip(inner.constvars, consts, strict=True))}
            sub_g.update(zip(inner.invars, g_in, strict=True))
            sub_v = {
                w: env_v[a]
                for w, a in zip(inner.invars, eqn.invars, strict=True)
                if _class(a, classes) in (L, P)
            }
            sub_cls = {w: _class(a, classes) for w, a in zip(inner.invars, eqn.invars, strict=True)}
            classify(inner.eqns, [], sub_cls)
            _run(inner.eqns, sub_g, sub_v, sub_cls, bind)
            for v, a in zip(eqn.outvars, inner.outvars, strict=True):
                env_g[v] = read(sub_g, a)
                if _class(a, sub_cls) in (L, P):
                    env_v[v] = read(sub_v, a)
            continue
        g_in = [read(env_g, a) for a in eqn.invars]
        outs_g = bind(eqn, g_in)
        env_g.update(zip(eqn.outvars, outs_g, strict=True))
        if classes[eqn.outvars[0]] in (L, P):
            v_in = [
                env_v[a] if _class(a, classes) in (L, P) else x
                for a, x in zip(eqn.invars, g_in, strict=True)
            ]
            env_v.update(zip(eqn.outvars, bind(eqn, v_in), strict=True))
