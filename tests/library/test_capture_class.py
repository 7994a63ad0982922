"""Issue 20: capture is exact or refuses, for the class, not the examples.

A property test draws model programs from a small grammar (dtype, ReLU spelling, where the
zero comes from, wrappers, a hand LayerNorm, vmapped ensembles of any size) and checks that
the sites found are the program's ReLUs, masks are ``z > 0`` of a hand computation, and flip,
dead and always-on counts are a recount; then one test per family of the issue's "Why".
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import regime_jax as rj
from regime_jax import analyzer
from regime_jax.capture import Site

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
SPELLINGS = ("nn.relu", "max_z0", "max_0z", "clip", "where", "where_le", "mul", "zeros_like")
ZEROS = ("literal", "jit_arg", "checkpoint_arg", "custom_jvp_arg", "scan_closed")


def _relu(z, spelling, zero_from):
    """One ReLU of ``z``, spelled ``spelling``, its zero reaching the max by ``zero_from``."""
    zero = jnp.zeros((), z.dtype)
    if spelling == "nn.relu":
        return jax.nn.relu(z)
    if spelling == "clip":
        return jnp.clip(z, 0)
    if spelling == "where":
        return jnp.where(z > 0, z, 0)
    if spelling == "where_le":
        return jnp.where(z <= 0, jnp.zeros_like(z), z)
    if spelling == "mul":
        return z * (z > 0)
    if spelling == "zeros_like":
        return jnp.maximum(z, jnp.zeros_like(z))
    fn = (
        (lambda z, c: jnp.maximum(z, c)) if spelling == "max_z0" else lambda z, c: jnp.maximum(c, z)
    )
    if zero_from == "jit_arg":
        return jax.jit(fn)(z, zero)
    if zero_from == "checkpoint_arg":
        return jax.checkpoint(fn)(z, zero)
    if zero_from == "custom_jvp_arg":
        f = jax.custom_jvp(fn)
        f.defjvp(lambda primals, tangents: (fn(*primals), tangents[0] * (primals[0] > 0)))
        return f(z, zero)
    if zero_from == "scan_closed":
        zeros_u = jnp.zeros(z.shape[-1:], z.dtype)  # closed over by the scan body
        return jax.lax.scan(lambda c, _: (fn(c, zeros_u), None), z, None, length=1)[0]
    return fn(z, 0.0)


def _hand_ln(h):
    mean = h.mean(-1, keepdims=True)
    var = jnp.maximum((h * h).mean(-1, keepdims=True) - mean * mean, 0.0)  # not a layer
    return (h - mean) * jax.lax.rsqrt(var + 1e-5)


def _program(cfg):
    """``(apply_fn, reference)``: the model, and a hand computation of its pre-activations."""
    dtype = DTYPES[cfg["dtype"]]

    def layers(ws, x, spell, keep):
        h = x.astype(dtype)
        for i, w in enumerate(ws):
            z = h @ w.astype(dtype)
            if cfg["norm"]:
                z = _hand_ln(z)
            if keep is not None:
                keep.append(z)
            h = _relu(z, spell[i % len(spell)], cfg["zero"]) if keep is None else jnp.maximum(z, 0)
        return h.astype(jnp.float32).sum(-1)

    def apply_fn(params, x):
        if cfg["wrap"] == "vmap_examples":  # a per-example function, vmapped over examples
            one = lambda ws: jax.vmap(lambda xi: layers(ws, xi, cfg["spell"], None))(x)
        else:
            one = lambda ws: layers(ws, x, cfg["spell"], None)
        out = jax.vmap(one)(params) if cfg["members"] else one(params)
        if cfg["bad"] == "vmapped_cond":  # per-example routing into a branch with a ReLU
            branch = lambda o: jax.nn.relu(o - 1.0)
            out = jax.vmap(lambda o: jax.lax.cond(o.sum() > 0, branch, jnp.sin, o))(out)
        elif cfg["bad"] == "merged":  # the examples merged with another axis
            out = jax.nn.relu(jnp.stack([out, out], -1).reshape(-1))
        elif cfg["bad"] == "cond":
            out = jax.lax.cond(out.sum() > 0, jax.nn.relu, jnp.sin, out)
        return out

    def body(params, x):
        if cfg["wrap"] == "checkpoint":
            return jax.checkpoint(apply_fn)(params, x)
        if cfg["wrap"] == "remat_policy":
            policy = jax.checkpoint_policies.nothing_saveable
            return jax.checkpoint(apply_fn, policy=policy)(params, x)
        if cfg["wrap"] == "jit":
            return jax.jit(apply_fn)(params, x)
        return apply_fn(params, x)

    def reference(params, x):
        if not cfg["members"]:
            keep = []
            layers(params, x, cfg["spell"], keep)
            return keep
        per = []
        for m in range(cfg["members"]):
            keep = []
            layers([w[m] for w in params], x, cfg["spell"], keep)
            per.append(keep)
        return [jnp.stack([p[i] for p in per], axis=1) for i in range(len(params))]

    return body, reference


def _params(cfg, key, units):
    shapes = [(cfg["in"], units), *[(units, units)] * (cfg["depth"] - 1)]
    keys = jax.random.split(key, len(shapes))
    lead = (cfg["members"],) if cfg["members"] else ()
    return [
        jax.random.normal(k, lead + s) / np.sqrt(s[0]) for k, s in zip(keys, shapes, strict=True)
    ]


def _recount(a, b):
    return int(np.sum(np.asarray(a > 0) != np.asarray(b > 0)))


def _check_program(cfg, p):
    apply_fn, reference = _program(cfg)
    x = jax.random.normal(jax.random.key(cfg["seed"]), (p, cfg["in"]))
    params = _params(cfg, jax.random.key(cfg["seed"] + 1), cfg["units"])
    preacts_fn = rj.capture_relus(apply_fn)
    if cfg["bad"] != "none":  # unsupported: refused, never measured
        with pytest.raises(rj.CaptureError):
            preacts_fn(params, x)
        return
    _, preacts = preacts_fn(params, x)
    truth = reference(params, x)
    assert len(preacts) == cfg["depth"], (list(preacts), cfg)  # the ReLUs, no variance clamp
    with jax.disable_jit():  # op by op, as capture evaluates a nested jit: bit for bit
        np.testing.assert_array_equal(preacts_fn(params, x)[0], apply_fn(params, x))
    for z, want in zip(preacts.values(), truth, strict=True):
        assert z.shape == want.shape and z.dtype == want.dtype
        close = np.abs(np.asarray(want, np.float32)) > 1e-2  # bits far from the kink
        np.testing.assert_array_equal(np.asarray(z > 0)[close], np.asarray(want > 0)[close])
    table = preacts_fn.sites(params, x)
    assert [s.name for s in table if s.taken] == list(preacts)
    assert sum(not s.taken for s in table) == (cfg["depth"] if cfg["norm"] else 0)
    # counts: the monitor between two parameter settings against a recount
    params2 = jax.tree.map(lambda w: w + 0.3 * jnp.sign(jnp.sin(17 * w)), params)
    monitor = rj.pattern_monitor(preacts_fn, x)
    state = monitor.init(params)
    updates = jax.tree.map(jnp.subtract, params2, params)
    metrics, _ = monitor.update(state, params2, updates)
    z1, z2 = preacts_fn(params, x)[1], preacts_fn(params2, x)[1]
    total = sum(np.asarray(z).size for z in z1.values())
    flips = sum(_recount(z1[k], z2[k]) for k in z1)
    np.testing.assert_allclose(float(metrics["flip/all"]), flips / total, rtol=1e-6)
    for k, z in z2.items():
        on = np.asarray(z > 0).reshape(p, -1)
        np.testing.assert_allclose(float(metrics[f"dead/{k}"]), np.mean(~on.any(0)), rtol=1e-6)
        np.testing.assert_allclose(float(metrics[f"always_on/{k}"]), np.mean(on.all(0)), rtol=1e-6)


PROGRAMS = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(sorted(DTYPES)),
        "spell": st.lists(st.sampled_from(SPELLINGS), min_size=1, max_size=3),
        "zero": st.sampled_from(ZEROS),
        "wrap": st.sampled_from(("none", "jit", "checkpoint", "remat_policy", "vmap_examples")),
        "bad": st.sampled_from(("none",) * 6 + ("vmapped_cond", "merged", "cond")),
        "norm": st.booleans(),
        "members": st.sampled_from((0, 0, 2, 4)),
        "depth": st.integers(1, 3),
        "units": st.sampled_from((3, 8, 9)),
        "in": st.sampled_from((4, 5)),
        "seed": st.integers(0, 1000),
    }
)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(cfg=PROGRAMS, p=st.sampled_from((2, 4)))
def test_drawn_programs_are_measured_exactly(cfg, p):
    """Sites = the program's ReLUs; masks = z > 0 by hand; flips, dead, always-on recounted.
    An ensemble with as many members as probe examples (members 4, p 4) is drawn too."""
    _check_program(cfg, p)


@pytest.mark.heavy
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(cfg=PROGRAMS, p=st.sampled_from((1, 2, 3, 4, 7)))
def test_drawn_programs_are_measured_exactly_heavy(cfg, p):
    _check_program(cfg, p)


# ----------------------------------------------------------------------------- families
def test_every_float_dtype_is_a_relu_and_mixed_precision_keeps_every_layer():
    w = jax.random.normal(jax.random.key(0), (5, 7))
    x = jax.random.normal(jax.random.key(1), (6, 5))
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16, *([jnp.float8_e4m3fn] * 1)):
        fn = lambda p, x, d=dtype: jax.nn.relu((x @ p).astype(d)).astype(jnp.float32)
        _, pre = rj.capture_relus(fn)(w, x)
        assert [z.dtype for z in pre.values()] == [jnp.dtype(dtype)]

    def mixed(p, x):
        h = jax.nn.relu(x @ p)  # f32
        return jax.nn.relu(h.astype(jnp.bfloat16) @ jnp.ones((7, 3), jnp.bfloat16))

    _, pre = rj.capture_relus(mixed)(w, x)
    assert [str(z.dtype) for z in pre.values()] == ["float32", "bfloat16"]


def test_vmap_ensemble_axis_is_a_unit_axis_whatever_its_size():
    """M members == P examples: dead / always-on are over the probe examples, exactly."""
    p = 6
    ws = jax.random.normal(jax.random.key(0), (p, 5, 7))
    x = jax.random.normal(jax.random.key(1), (p, 5))
    fn = lambda ws, x: jax.vmap(lambda w: jax.nn.relu(x @ w - 0.5))(ws).sum(-1)
    preacts_fn = rj.capture_relus(fn)
    (z,) = preacts_fn(ws, x)[1].values()
    want = jnp.stack([x @ w - 0.5 for w in ws], axis=1)  # [P, M, U]
    np.testing.assert_allclose(z, want, rtol=1e-6)
    m = analyzer.pattern_metrics(None, analyzer.patterns_from_preacts({"e": z}))
    on = np.asarray(want > 0)
    assert float(m["dead/e"]) == pytest.approx(np.mean(~on.any(0)))
    assert float(m["always_on/e"]) == pytest.approx(np.mean(on.all(0)))
    (site,) = preacts_fn.sites(ws, x)
    assert site.taken and site.shape == (p, p, 7)


def test_examples_on_another_axis_are_moved_first():
    """A pre-activation traced as [units, P] (a transpose before the ReLU) comes back [P, units]:
    the probe axis is the one that follows the number of examples, wherever it is."""
    w = jax.random.normal(jax.random.key(0), (5, 4))
    x = jax.random.normal(jax.random.key(1), (6, 5))
    preacts_fn = rj.capture_relus(lambda p, x: jax.nn.relu((x @ p).T).sum(0))
    (z,) = preacts_fn(w, x)[1].values()
    np.testing.assert_array_equal(z, x @ w)
    (site,) = preacts_fn.sites(w, x)
    assert (site.probe_axis, site.shape, site.units) == (1, (6, 4), 4)


def test_statistics_and_parameters_are_not_layers():
    """A variance clamp (by hand, in Equinox's LayerNorm / GroupNorm) and a ReLU of a
    parameter whose leading size equals P are listed, not measured."""
    p = 6
    x = jax.random.normal(jax.random.key(1), (p, 5))
    params = {"w": jax.random.normal(jax.random.key(0), (5, 8)), "s": jnp.ones((p, 8))}

    def fn(params, x):
        h = jax.nn.relu(_hand_ln(x @ params["w"]))
        return h * jax.nn.relu(params["s"]).sum()

    preacts_fn = rj.capture_relus(fn)
    assert list(preacts_fn(params, x)[1]) == ["w"]
    reasons = {s.reason.split(" (")[0] for s in preacts_fn.sites(params, x) if not s.taken}
    assert reasons == {"a statistic of each example", "does not depend on the example"}

    class Eqx(eqx.Module):
        l1: eqx.nn.Linear
        ln: eqx.nn.LayerNorm
        gn: eqx.nn.GroupNorm

        def __init__(self, key):
            self.l1 = eqx.nn.Linear(5, 8, key=key)
            self.ln, self.gn = eqx.nn.LayerNorm(8), eqx.nn.GroupNorm(2, 8)

        def __call__(self, x):
            return jax.nn.relu(self.gn(jax.nn.relu(self.ln(self.l1(x)))))

    model = Eqx(jax.random.key(2))
    leaves, static = eqx.partition(model, eqx.is_array)
    apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
    preacts_fn = rj.capture_relus(apply_fn)
    _, pre = preacts_fn(leaves, x)
    assert len(pre) == 2 and all(z.shape == (p, 8) for z in pre.values())
    h = jax.vmap(model.l1)(x)
    np.testing.assert_array_equal(next(iter(pre.values())) > 0, jax.vmap(model.ln)(h) > 0)
    assert next(iter(pre)) == "l1"  # Equinox's class-path scopes are no names: the kernel's


def test_routing_by_a_vmapped_cond_is_refused_and_a_plain_cond_too():
    w = jax.random.normal(jax.random.key(0), (5, 5))
    x = jax.random.normal(jax.random.key(1), (6, 5))

    def moe(p, x):
        expert = lambda s: lambda h: jax.nn.relu(h @ p * s)
        return jax.vmap(lambda xi: jax.lax.cond(xi[0] > 0, expert(1.0), expert(-1.0), xi))(x)

    with pytest.raises(rj.CaptureError, match=r"one branch of a vmapped lax\.cond"):
        rj.capture_relus(moe)(w, x)

    def switch(p, x):
        branches = [lambda h, s=s: jax.nn.relu(h @ p + s) for s in range(3)]
        idx = jnp.clip(x[:, 0].astype(jnp.int32), 0, 2)
        return jax.vmap(lambda i, xi: jax.lax.switch(i, branches, xi))(idx, x)

    with pytest.raises(rj.CaptureError, match=r"one branch of a vmapped lax\.cond"):
        rj.capture_relus(switch)(w, x)
    # a ReLU before the routing serves every example: kept
    before = lambda p, x: moe(p, jax.nn.relu(x @ p))
    with pytest.raises(rj.CaptureError, match=r"one branch"):
        rj.capture_relus(before)(w, x)
    plain = lambda p, x: jax.lax.cond(x.sum() > 0, lambda h: jax.nn.relu(h @ p), jnp.sin, x)
    with pytest.raises(rj.CaptureError, match=r"lax.cond / lax.switch \(primitive 'cond'\)"):
        rj.capture_relus(plain)(w, x)


def test_merged_probe_axis_and_scan_over_examples_are_refused():
    w = jax.random.normal(jax.random.key(0), (5, 5))
    x = jax.random.normal(jax.random.key(1), (6, 5))
    with pytest.raises(rj.CaptureError, match="do not have an axis of their own"):
        rj.capture_relus(lambda p, x: jax.nn.relu((x @ p).reshape(-1)))(w, x)
    with pytest.raises(rj.CaptureError, match=r"lax\.scan / lax\.map over the probe examples"):
        rj.capture_relus(lambda p, x: jax.lax.map(lambda xi: jax.nn.relu(xi @ p), x))(w, x)


def test_not_measured_activations_are_said_never_silently_absent():
    w = jax.random.normal(jax.random.key(0), (5, 5))
    x = jax.random.normal(jax.random.key(1), (6, 5))
    for fn, what in (
        (lambda p, x: jax.nn.gelu(x @ p), "jax.nn.gelu"),
        (lambda p, x: jax.nn.relu6(x @ p), "jax.nn.relu6"),
        (lambda p, x: jax.nn.leaky_relu(x @ p), "jax.nn.leaky_relu"),
        (lambda p, x: jnp.clip(x @ p, 0, 6), "clipped above"),
    ):
        with pytest.raises(rj.CaptureError, match=rf"no ReLU found.*not measured.*{what}"):
            rj.capture_relus(fn)(w, x)
    both = lambda p, x: jax.nn.relu(x @ p) + jax.nn.relu6(x @ p) + jnp.clip(x @ p, 0, 6)
    table = rj.capture_relus(both).sites(w, x)
    assert [s.taken for s in table].count(True) == 1
    assert {s.spelling for s in table if not s.taken} >= {"jax.nn.relu6", "jnp.clip"}


def test_site_table_lists_shape_axis_dtype_spelling_source_and_params():
    params = {"fc1": {"w": jnp.ones((5, 4)), "b": jnp.zeros(4)}, "head": {"w": jnp.ones((4, 2))}}
    x = jnp.ones((3, 5))

    def fn(p, x):
        h = jnp.where(x @ p["fc1"]["w"] + p["fc1"]["b"] > 0, x @ p["fc1"]["w"] + p["fc1"]["b"], 0)
        return h @ p["head"]["w"]

    (site,) = rj.capture_relus(fn).sites(params, x)
    assert isinstance(site, Site) and site.taken and site.name == "fc1"
    assert (site.shape, site.probe_axis, site.units, site.dtype) == ((3, 4), 0, 4, "float32")
    assert site.spelling == "jnp.where" and "test_capture_class.py:" in site.source
    assert site.params == ("fc1/b", "fc1/w")
    assert "fc1" in rj.format_sites([site])


def test_pattern_monitor_includes_and_excludes_sites_by_name():
    params = [jnp.ones((5, 4)), -jnp.ones((4, 4)) / 3]
    x = jax.random.normal(jax.random.key(1), (6, 5))
    fn = lambda p, x: jax.nn.relu(jax.nn.relu(x @ p[0]) @ p[1] + 0.1)
    preacts_fn = rj.capture_relus(fn)
    keep = rj.pattern_monitor(preacts_fn, x, sites=["1"]).init(params)
    assert list(keep.masks) == ["1"]
    drop = rj.pattern_monitor(preacts_fn, x, exclude=["1"]).init(params)
    assert list(drop.masks) == ["0"]
    with pytest.raises(ValueError, match=r"sites=\['nope'\].*'0', '1'"):
        rj.pattern_monitor(preacts_fn, x, sites=["nope"]).init(params)


def test_capture_output_is_bit_identical_eagerly_and_masks_match_their_z_under_jit():
    """README's promise, precisely: eagerly ``out`` is bit-identical; under jit the masks are
    ``z > 0`` of the pre-activations the jitted program returns."""
    w = jax.random.normal(jax.random.key(0), (5, 7))
    x = jax.random.normal(jax.random.key(1), (6, 5))
    fn = lambda p, x: jax.nn.relu(_hand_ln(x @ p)) @ jnp.ones((7, 2))
    out, _ = rj.capture_relus(fn)(w, x)
    np.testing.assert_array_equal(out, fn(w, x))
    out_j, pre_j = jax.jit(rj.capture_relus(fn))(w, x)
    np.testing.assert_allclose(out_j, jax.jit(fn)(w, x), rtol=1e-5, atol=1e-6)
    masks = analyzer.patterns_from_preacts(pre_j)
    for k, z in pre_j.items():
        np.testing.assert_array_equal(masks[k].unpack(), np.asarray(z > 0))
