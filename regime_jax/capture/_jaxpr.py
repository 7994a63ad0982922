"""The jaxpr interpreter behind :mod:`regime_jax.capture` (private: the JAX internals live here).

:func:`evaluate` runs a jaxpr equation by equation, binding the same primitives, for one or
two *streams* at once, or for none (``args=None``: the analysis walk, which only follows the
:class:`~regime_jax.capture._infer.Info` of every value and lists the ReLU candidates). Every
value in its environment is a tuple with one entry per stream:

* one stream (``capture_relus``): the function itself; each taken ReLU's input is recorded.
* two streams (``gate_relus``): ``(values, gates)``, evaluated in lockstep through the same
  equations. At a taken ReLU with inputs ``(z_v, z_g)`` the gate stream takes the ReLU as
  written, ``h_g = relu(z_g)``, and the value stream is gated by it:
  ``h_v = where(z_g > 0, z_v, h_g)``. Where the gate is off ``h_g`` is 0 (``where(z_g > 0,
  z_v, 0)``, the gated unit), except for a NaN gate, which stays NaN. So with ``z_g``
  bit-equal to ``z_v`` (gates == values) ``h_v`` is bit-identical to ``relu(z_v)`` for every
  input, -0.0 and NaN included, on every backend.

An equation whose inputs are the very same objects in every stream (it reads only shared
inputs, literals or constants) is bound once and its result shared: both streams see the
same dropout mask, and work on the inputs alone is not done twice.

Candidates are numbered in trace order by every walk alike (the analysis walk and the
interpreter visit the same equations in the same order), so a decision made by the analysis
("site 3 is a variance clamp, not a layer") is read by the interpreter by number.

Tested on jax 0.10.2; the primitive names it relies on are in the tables below.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp

from regime_jax import bitmask
from regime_jax.capture import _acts, _infer
from regime_jax.capture._infer import Info

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
# jax.nn functions that are not ReLUs; a max(., 0) inside them is not a site.
NOT_MEASURED = (
    "relu6",
    "leaky_relu",
    "hard_tanh",
    "elu",
    "celu",
    "selu",
    "gelu",
    "silu",
    "swish",
    "hard_silu",
    "hard_swish",
    "hard_sigmoid",
    "softplus",
    "sparse_plus",
    "squareplus",
    "mish",
    "glu",
    "log_sigmoid",
    "sigmoid",
    "standardize",
)
WHAT_IS_RECOGNISED = (
    "recognised: max(z, 0) in any float dtype with the zero on either side (jax.nn.relu = "
    "flax.linen.relu = flax.nnx.relu, jnp.maximum(z, 0), jnp.clip(z, 0)), "
    "jnp.where(z > 0, z, 0) and z * (z > 0), whatever route the zero takes; not measured: "
    + ", ".join(f"jax.nn.{f}" for f in NOT_MEASURED[:9])
    + " and other non-ReLU activations, and max(z, 0) clipped above (relu6, jnp.clip(z, 0, 6))"
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


def _frames(eqn: jex.JaxprEqn) -> list[Any]:
    traceback = eqn.source_info.traceback
    return list(traceback.frames) if traceback is not None else []


def library_reason(eqn: jex.JaxprEqn) -> str | None:
    """Why a ``max(., 0)`` written inside a library function is not a ReLU, else None."""
    for frame in _frames(eqn):
        path = frame.file_name.replace("\\", "/")
        if path.endswith("jax/_src/nn/functions.py"):
            if frame.function_name == "relu":
                return None
            return f"inside jax.nn.{frame.function_name}: not a ReLU, not measured"
        if "/flax/" in path and path.endswith("normalization.py"):
            return "flax normalization's variance clamp: not an activation"
    return None


def spelling(eqn: jex.JaxprEqn, form: str) -> str:
    """How the user wrote a candidate: ``jax.nn.relu``, ``jnp.clip``, ``jnp.where``..."""
    if form == "mul":
        return "z * (z > 0)"
    frames = _frames(eqn)
    for frame in frames:
        if frame.file_name.replace("\\", "/").endswith("jax/_src/nn/functions.py"):
            return f"jax.nn.{frame.function_name}"
    numpy = [f for f in frames if "/jax/_src/numpy/" in f.file_name.replace("\\", "/")]
    for frame in numpy:
        fn = frame.function_name.lstrip("_")
        if fn in ("clip", "where", "maximum"):
            return f"jnp.{fn}"
    if form == "max" and any(f.file_name.endswith("ufunc_api.py") for f in numpy):
        return "jnp.maximum"
    return {"select": "lax.select_n(z > 0, 0, z)", "max": "lax.max(z, 0)"}[form]


def source(eqn: jex.JaxprEqn) -> str:
    """``file:line`` of the user's code that applied the ReLU ('' if unknown)."""
    frames = _frames(eqn)
    for frame in frames:
        path = frame.file_name.replace("\\", "/")
        if (
            "/jax/" in path
            or "/jaxlib/" in path
            or "/regime_jax/capture/" in path
            or path.endswith("regime_jax/models/record.py")
        ):
            continue
        if "/flax/" in path and "/flax/linen/activation" in path:
            continue
        return f"{path}:{frame.line_num}"
    return ""


def _routing_cases(eqn: jex.JaxprEqn) -> bool:
    """A ``select_n`` that picks, per example, among the branches of a vmapped cond/switch."""
    if eqn.primitive.name != "select_n":
        return False
    names = {(f.function_name, f.file_name.rsplit("/", 1)[-1]) for f in _frames(eqn)}
    return ("_cond_batching_rule", "conditionals.py") in names and any(
        fn == "_bcast_select_n" for fn, _ in names
    )


# ------------------------------------------------------------------ names
_TRANSFORM = re.compile(r"\w+\(|\)")


def _scope(outer: str, eqn: jex.JaxprEqn) -> str:
    """The name-stack path; class-path scopes (Equinox's ``eqx.nn.Linear``) are no names."""
    inner = _TRANSFORM.sub("", str(eqn.source_info.name_stack))
    return "/".join(p for p in (*outer.split("/"), *inner.split("/")) if p and "." not in p)


def root(jaxpr: jex.Jaxpr) -> str:
    """The leading scope component shared by every named equation ('' if none)."""
    firsts = {_TRANSFORM.sub("", str(e.source_info.name_stack)).split("/")[0] for e in jaxpr.eqns}
    firsts.discard("")
    return firsts.pop() if len(firsts) == 1 else ""


def module_of(kernels: frozenset) -> str:
    """The module whose parameters produce a pre-activation: its kernels' common path."""
    mods = {k.rsplit("/", 1)[0] if "/" in k else k for k in kernels}
    if not mods:
        return ""
    parts = [m.split("/") for m in mods]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return "/".join(common)


def name_of(scope: str, module: str, site: int, root: str, fn: str = _acts.RELU) -> str:
    """A site's name before de-duplication (the rule of the capture docstring); a site of
    another function than ReLU gets ``:<fn>`` appended (after any scan index)."""
    parts = scope.split("/") if scope else []
    if root and parts and parts[0] == root:
        parts = parts[1:]
    return "/".join(parts) or module or (f"relu_{site}" if fn == _acts.RELU else f"site_{site}")


def fn_suffix(fn: str) -> str:
    """What a site's key ends with: '' for ReLU, ``:gelu`` for a GELU."""
    return "" if fn == _acts.RELU else f":{fn}"


class Entry(NamedTuple):
    scope: str
    site: int
    suffix: str
    value: Any
    module: str
    fn: str = _acts.RELU


def names(entries: Sequence[Entry], root: str) -> list[tuple[str, Entry]]:
    """``[(name, entry)]`` in trace order, a name taken earlier getting ``#<n>``."""
    out: list[tuple[str, Entry]] = []
    taken: set[str] = set()
    for e in entries:
        name = name_of(e.scope, e.module, e.site, root, e.fn) + e.suffix + fn_suffix(e.fn)
        if name in taken:
            n = 1
            while f"{name}#{n}" in taken:
                n += 1
            name = f"{name}#{n}"
        taken.add(name)
        out.append((name, e))
    return out


# ------------------------------------------------------------------ recorders
class Candidate(NamedTuple):
    """A ReLU candidate as the analysis walk saw it (one per site index)."""

    site: int
    scope: str
    module: str
    form: str
    spelling: str
    source: str
    shape: tuple[int, ...]
    dtype: str
    tags: frozenset
    feeds: frozenset
    scans: tuple[int, ...]  # lengths of the enclosing scans, outermost first


class Recorder:
    """Counts candidates in trace order; records the taken ones' pre-activations.

    ``take``: the site indices to record (and gate); None takes every candidate. With
    ``analyse`` it also lists every candidate (:class:`Candidate`), every not-measured
    activation it met, and the sites a vmapped cond routes per example.
    """

    def __init__(
        self,
        streams: int,
        take: frozenset | None = None,
        analyse: bool = False,
        acts: frozenset = frozenset(_acts.DEFAULT),
    ):
        self.acts = acts  # the functions recorded (``relu`` and the opted-in others)
        self.counter = [0]  # shared with nested recorders: one index per candidate
        self.streams = streams  # 0: analysis only; 1: capture; 2: (values, gates)
        self.take = take
        self.entries: list[Entry] = []
        self.candidates: list[Candidate] = [] if analyse else None
        self.notes: dict[tuple[str, str], str] = {}
        self.routed: set[int] = set()
        self.clipped: set[int] = set()
        self.masks: dict[int, Any] | None = None  # site -> bool mask (one stream: masked)

    def new_site(self) -> int:
        self.counter[0] += 1
        return self.counter[0] - 1

    def taken(self, site: int) -> bool:
        return self.take is None or site in self.take

    def nested(self) -> Recorder:
        """A recorder for a traced body (a body may be traced more than once: its own count)."""
        sub = Recorder.__new__(Recorder)
        sub.__dict__.update(self.__dict__)
        sub.entries, sub.counter = [], [self.counter[0]]
        return sub


class _Probe(Recorder):
    """A recorder for questions only (infos of a sub-computation, is there a candidate?)."""

    def __init__(self, acts: frozenset):
        super().__init__(0, acts=acts)
        self.found = False

    def new_site(self) -> int:
        self.found = True
        return -1


def _note_activation(eqn: jex.JaxprEqn, rec: Recorder) -> None:
    if rec.candidates is None:
        return
    for frame in _frames(eqn):
        if frame.file_name.replace("\\", "/").endswith("jax/_src/nn/functions.py"):
            fn = frame.function_name
            if fn in NOT_MEASURED and fn != "standardize":
                where = source(eqn)
                rec.notes.setdefault((f"jax.nn.{fn}", where), "not a ReLU: not measured")
            return


# ------------------------------------------------------------------ the interpreter
def look(
    jaxpr: jex.Jaxpr,
    consts: Sequence[Any],
    infos: Sequence[Info],
    scans: tuple[int, ...] = (),
    acts: frozenset = frozenset(_acts.DEFAULT),
) -> tuple[bool, list[Info]]:
    """One walk with no numbers: whether ``jaxpr`` (or a sub-computation of it) applies a
    ReLU candidate (or an opted-in activation), and the :class:`Info` of its outputs."""
    probe = _Probe(acts)
    out_infos = evaluate(jaxpr, consts, None, infos, [""] * len(infos), "", probe, scans)[2]
    return probe.found, out_infos


def evaluate(
    jaxpr: jex.Jaxpr,
    consts: Sequence[Any],
    args: Sequence[Streams] | None,
    infos: Sequence[Info],
    arg_scopes: Sequence[str],
    outer: str,
    rec: Recorder,
    scans: tuple[int, ...] = (),
    where: str = "",
) -> tuple[list[Streams] | None, list[str], list[Info]]:
    """Evaluates ``jaxpr`` like ``jax.core.eval_jaxpr``, per stream, recording taken ReLUs.

    ``args`` holds one tuple per input variable, one value per stream (None: the analysis
    walk, no values). Returns the outputs, the scope of the equation that produced each (the
    name a ReLU of that value gets) and each output's :class:`Info`. ``where``: the user's
    ``file:line`` of the enclosing call, for equations traced where no user frame shows.
    """
    k = rec.streams
    values = args is not None
    env: dict[Any, Streams] = {}
    scopes: dict[Any, str] = {}
    info: dict[Any, Info] = {}
    for v, c, i in zip(jaxpr.constvars, consts, _infer.const_infos(consts), strict=True):
        env[v], scopes[v], info[v] = (c,) * k, "", i
    for n, (v, s, i) in enumerate(zip(jaxpr.invars, arg_scopes, infos, strict=True)):
        env[v], scopes[v], info[v] = (tuple(args[n]) if values else None), s, i

    def read(atom) -> Streams:
        return (atom.val,) * k if isinstance(atom, jex.Literal) else env[atom]

    def scope_of(atom) -> str:
        return "" if isinstance(atom, jex.Literal) else scopes[atom]

    def info_of(atom) -> Info:
        return _infer.literal_info(atom) if isinstance(atom, jex.Literal) else info[atom]

    eqns, pos = jaxpr.eqns, 0
    while pos < len(eqns):
        eqn, start, pos = eqns[pos], pos, pos + 1
        here = _scope(outer, eqn)
        call = _match_call(jaxpr, start, rec.acts)
        if call is not None:  # an opted-in activation other than ReLU
            pos = call.stop
            z, z_info = call.z, info_of(call.z)
            site, module = rec.new_site(), module_of(z_info.kernels)
            if rec.candidates is not None:
                rec.candidates.append(
                    Candidate(
                        site,
                        scope_of(z),
                        module,
                        call.fn,
                        call.spelling,
                        source(eqn) or where,
                        tuple(z.aval.shape),
                        str(z.aval.dtype),
                        z_info.tags,
                        z_info.feeds | z_info.kernels,
                        scans,
                    )
                )
            if values:
                zs = read(z)
                if rec.taken(site):
                    rec.entries.append(Entry(scope_of(z), site, "", zs, module, call.fn))
                if rec.taken(site) and k == 2 and not _shared([zs]):
                    env[call.out] = _gated_call(call, zs, here)
                else:
                    for e in eqns[start : call.stop]:
                        outs = _bind_streams(e, [read(a) for a in e.invars], here, k)
                        env.update(zip(e.outvars, outs, strict=True))
            scopes[call.out], info[call.out] = here, _infer.site_info(z_info, site)
            if not values:
                env[call.out] = None
            continue
        in_infos = [info_of(a) for a in eqn.invars]
        invals = [read(a) for a in eqn.invars] if values else None
        match = _infer.relu_operand(eqn, in_infos) if _acts.RELU in rec.acts else None
        reason = library_reason(eqn) if match is not None else None
        subs = _subjaxprs(eqn.params)
        _note_activation(eqn, rec)
        if match is not None and reason is None:
            i, form = match
            z = eqn.invars[i]
            site = rec.new_site()
            z_info = in_infos[i]
            module = module_of(z_info.kernels)
            if rec.candidates is not None:
                rec.candidates.append(
                    Candidate(
                        site,
                        scope_of(z),
                        module,
                        form,
                        spelling(eqn, form),
                        source(eqn) or where,
                        tuple(z.aval.shape),
                        str(z.aval.dtype),
                        z_info.tags,
                        z_info.feeds | z_info.kernels,
                        scans,
                    )
                )
            out_infos = [_infer.site_info(z_info, site)]
            outs = None
            if values:
                if rec.taken(site):
                    rec.entries.append(Entry(scope_of(z), site, "", read(z), module))
                    if rec.masks is not None:
                        outs = [_masked(read(z)[0], rec.masks[site], here)]
                    else:
                        outs = _relu(eqn, invals, read(z), here, k)
                else:
                    outs = _bind_streams(eqn, invals, here, k)
        elif subs:
            outs, out_infos = _higher_order(
                eqn,
                invals,
                in_infos,
                [scope_of(a) for a in eqn.invars],
                here,
                rec,
                scans,
                source(eqn) or where,
            )
        else:
            if reason is not None and rec.candidates is not None:
                rec.notes.setdefault((spelling(eqn, match[1]), source(eqn)), reason)
            if eqn.primitive.name == "clamp" and in_infos and in_infos[0].zero:
                if rec.candidates is not None:
                    rec.notes.setdefault(
                        ("lax.clamp(0, z, hi)", source(eqn)), "clipped above: not measured"
                    )
            outs = _bind_streams(eqn, invals, here, k) if values else None
            out_infos = _infer.propagate(eqn, in_infos)
            clipped = _infer.clipped_site(eqn, in_infos)
            if clipped is not None:
                rec.clipped.add(clipped)
            if _routing_cases(eqn) and len(in_infos) > 2:
                cases = [x.sites for x in in_infos[1:]]
                rec.routed |= frozenset().union(*cases) - frozenset.intersection(*cases)
        for n, (v, inf) in enumerate(zip(eqn.outvars, out_infos, strict=True)):
            env[v], scopes[v], info[v] = (outs[n] if values else None), here, inf
    outs = [read(a) for a in jaxpr.outvars] if values else None
    return outs, [scope_of(a) for a in jaxpr.outvars], [info_of(a) for a in jaxpr.outvars]


def _match_call(jaxpr: jex.Jaxpr, i: int, acts: frozenset) -> _acts.Call | None:
    """The opted-in non-ReLU activation call starting at equation ``i``, if any."""
    if len(acts) == 1 and _acts.RELU in acts:
        return None

    def later_reads(stop: int) -> set:
        reads = {a for e in jaxpr.eqns[stop:] for a in e.invars if isinstance(a, jex.Var)}
        return reads | {a for a in jaxpr.outvars if isinstance(a, jex.Var)}

    try:
        return _acts.match(jaxpr.eqns, i, acts, later_reads)
    except _acts.NotDecoupled as err:
        raise CaptureError(f"{err} (at {source(jaxpr.eqns[i]) or '?'})") from None


def _gated_call(call: _acts.Call, zs: Streams, scope: str) -> Streams:
    """``(h_values, h_gates)`` at an opted-in activation: its decoupled form (_acts)."""
    try:
        h_v, h_g = _acts.run_gated(call, zs[0], zs[1], lambda e, vals: _bind(e, vals, scope))
    except _acts.NotDecoupled as err:
        raise CaptureError(
            f"{call.spelling} cannot be gated: {err}. Decoupling is defined for ReLU and for "
            f"activations z * g(z) (gelu, silu) or a select on the sign (leaky_relu)"
        ) from None
    return (h_v, h_g)


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


def _masked(z: Any, mask: Any, scope: str) -> Streams:
    """The masked ReLU: ``z`` where the given mask is on, else 0 (the gated unit of
    :func:`_relu` with ``z_g > 0`` replaced by a stored mask)."""
    with jax.named_scope(scope) if scope else contextlib.nullcontext():
        return (jnp.where(mask, z, jnp.zeros((), z.dtype)),)


def _sub_in_infos(jaxpr: jex.Jaxpr, in_infos: Sequence[Info]) -> list[Info]:
    if len(jaxpr.invars) == len(in_infos):
        return list(in_infos)
    return [_infer.carry_info(in_infos)] * len(jaxpr.invars)


def _higher_order(eqn, invals, in_infos, in_scopes, scope, rec: Recorder, scans, where):
    """A sub-computation: walked into where it holds a candidate, else bound whole."""
    name = eqn.primitive.name
    values = invals is not None
    if name in _SCAN:
        return _eval_scan(eqn, invals, in_infos, in_scopes, scope, rec, scans, where)
    if name in _INLINE | _CUSTOM | _REMAT:
        key = (
            "call_jaxpr"
            if name in _CUSTOM
            else ("jaxpr" if "jaxpr" in eqn.params else "call_jaxpr")
        )
        jaxpr, consts = _jaxpr_of(eqn.params[key])
        sub_in = _sub_in_infos(jaxpr, in_infos)
        if not values:  # the analysis walk: into every sub-computation
            _, _, out_infos = evaluate(
                jaxpr, consts, None, sub_in, in_scopes, scope, rec, scans, where
            )
            return None, out_infos
        found, out_infos = look(jaxpr, consts, sub_in, acts=rec.acts)
        if not found:
            return _bind_streams(eqn, invals, scope, rec.streams), out_infos
        if name in _REMAT:
            return _eval_remat(eqn, jaxpr, consts, invals, sub_in, in_scopes, scope, rec, scans)
        outs, _, out_infos = evaluate(
            jaxpr, consts, invals, sub_in, in_scopes, scope, rec, scans, where
        )
        if name in _CUSTOM and rec.streams == 1 and rec.masks is None:
            # capture: the output (and derivative rule) of the original call
            outs = _bind_streams(eqn, invals, scope, rec.streams)
        return outs, out_infos
    # cond, while, anything else: refused if a candidate is inside, else bound whole
    subs = _subjaxprs(eqn.params)
    if any(look(j, c, _sub_in_infos(j, in_infos), acts=rec.acts)[0] for j, c in subs):
        if name in _REFUSED:
            raise CaptureError(
                f"a ReLU inside {_REFUSED[name]} (primitive {name!r}) cannot be captured: which "
                f"branch runs, or how many iterations, is decided at run time, so the set of "
                f"units is not fixed. Move the ReLU out of the {_REFUSED[name]}, or use "
                f"jnp.where / lax.scan (a fori_loop with static bounds) instead."
            )
        raise CaptureError(
            f"primitive {name!r} holds a sub-computation with a ReLU inside, and "
            f"regime_jax.capture does not know how to look into it (jax {jax.__version__}); its "
            f"ReLUs would be skipped, so the function is refused. Supported: jit, "
            f"custom_jvp/custom_vjp, checkpoint/remat, scan."
        )
    outs = _bind_streams(eqn, invals, scope, rec.streams) if values else None
    return outs, [_infer.carry_info(in_infos) for _ in eqn.outvars]


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


def _eval_remat(eqn, jaxpr, consts, invals, sub_in, in_scopes, scope, rec: Recorder, scans):
    flat, unflatten = _flatten(invals)
    inner: list[tuple[Recorder, list[Info]]] = []

    def body(*args):
        sub = rec.nested()
        outs, _, out_infos = evaluate(
            jaxpr, consts, unflatten(args), sub_in, in_scopes, scope, sub, scans
        )
        inner[:] = [(sub, out_infos)]
        return outs, [e.value for e in sub.entries]

    wrapped = jax.checkpoint(
        body, prevent_cse=eqn.params.get("prevent_cse", True), policy=eqn.params.get("policy")
    )
    outs, recorded = wrapped(*flat)
    sub, out_infos = inner[0]
    _merge(rec, sub, recorded, stacked=0)
    return [tuple(o) for o in outs], out_infos


def _eval_scan(eqn, invals, in_infos, in_scopes, scope, rec: Recorder, scans, where=""):
    p = eqn.params
    jaxpr, consts = _jaxpr_of(p["jaxpr"])
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    carry_in = _infer.carry_info(in_infos)
    sub_in = [
        *in_infos[:n_consts],
        *(carry_in for _ in range(n_carry)),
        *(_infer.sliced(x) for x in in_infos[n_consts + n_carry :]),
    ]
    here = (*scans, p["length"])
    if invals is None:  # the analysis walk: into the body
        _, _, body_infos = evaluate(jaxpr, consts, None, sub_in, in_scopes, scope, rec, here, where)
        return None, _scan_out_infos(body_infos, n_carry, carry_in)
    found, body_infos = look(jaxpr, consts, sub_in, here, rec.acts)
    if not found:
        outs = _bind_streams(eqn, invals, scope, rec.streams)
        return outs, _scan_out_infos(body_infos, n_carry, carry_in)
    const_vals = invals[:n_consts]
    carry0 = [tuple(c) for c in invals[n_consts : n_consts + n_carry]]  # one leaf per stream
    xs_flat, unflatten_xs = _flatten(invals[n_consts + n_carry :])
    inner: list[tuple[Recorder, list[Info]]] = []

    def body(carry, x_flat):
        sub = rec.nested()
        args = [*const_vals, *carry, *unflatten_xs(x_flat)]
        outs, _, out_infos = evaluate(jaxpr, consts, args, sub_in, in_scopes, scope, sub, here)
        inner[:] = [(sub, out_infos)]
        return outs[:n_carry], (outs[n_carry:], [e.value for e in sub.entries])

    carry, (ys, recorded) = jax.lax.scan(
        body, carry0, xs_flat, length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    sub, body_infos = inner[0]
    _merge(rec, sub, recorded, stacked=p["length"])
    return [tuple(o) for o in (*carry, *ys)], _scan_out_infos(body_infos, n_carry, carry_in)


def _scan_out_infos(body_infos: Sequence[Info], n_carry: int, carry_in: Info) -> list[Info]:
    carry = [_infer.carry_info([carry_in, x]) for x in body_infos[:n_carry]]
    ys = [_infer.carry_info([x]) for x in body_infos[n_carry:]]
    return [*carry, *ys]


def _merge(rec: Recorder, sub: Recorder, values: Sequence[Streams], stacked: int) -> None:
    """Moves a nested recorder's entries into ``rec`` (split per iteration if ``stacked``)."""
    for e, zs in zip(sub.entries, values, strict=True):
        if stacked:
            for i in range(stacked):
                rec.entries.append(
                    e._replace(suffix=f"[{i}]{e.suffix}", value=tuple(z[i] for z in zs))
                )
        else:
            rec.entries.append(e._replace(value=tuple(zs)))
    rec.counter[0] = max(rec.counter[0], sub.counter[0])
