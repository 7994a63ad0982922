"""Gate freezing: the gated transform (capture.gate_relus, gating.gated_net) and disagreement.

With gates == values (F = the current step) the gated network is the network, bit for bit, on
every kind of model; with other gates every ReLU is ``z_values * [z_gates > 0]``, checked
against gated networks written by hand in plain jnp.
"""

from __future__ import annotations

import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BUILTIN
from flax import nnx

import regime_jax as rj
from regime_jax import gating, models

KEY = jax.random.key(0)


def _bits(a) -> np.ndarray:
    """The raw bits of a float array (so -0.0 != 0.0 and NaN payloads count)."""
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _assert_bit_equal(a, b, what="") -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(_bits(x), _bits(y), err_msg=what)


def _perturb(params, scale, seed):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    pairs = zip(leaves, keys, strict=True)
    noisy = [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in pairs]
    return jax.tree.unflatten(treedef, noisy)


# ----------------------------------------------------------------------------- models


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
        self.fc = nnx.Linear(4 * 4 * 4, 6, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.conv(x)), window_shape=(2, 2), strides=(2, 2))
        return self.head(jnp.maximum(self.fc(x.reshape(x.shape[0], -1)), 0.0))


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.Dense(8, name="fc2")(nn.relu(nn.Dense(12, name="fc1")(h))), None


class ScanRemat(nn.Module):
    """Linen nn.scan over nn.remat(Block), three stacked blocks."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8, name="embed")(x)
        blocks = nn.scan(
            nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        h, _ = blocks(name="blocks")(h, None)
        return nn.Dense(3, name="head")(h)


def plain_mlp(p, x):
    """Plain JAX: a list of (W, b); relu written three ways."""
    relus = [jax.nn.relu, lambda z: jnp.maximum(0.0, z), lambda z: jnp.clip(z, 0)]
    for (w, b), act in zip(p[:-1], relus, strict=False):
        x = act(x @ w + b)
    w, b = p[-1]
    return x @ w + b


def _plain_params(widths=(5, 9, 7, 3), seed=0):
    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(widths)))
    return [
        (jax.random.normal(next(keys), (a, b)) / a**0.5, 0.1 * jax.random.normal(next(keys), (b,)))
        for a, b in itertools.pairwise(widths)
    ]


def _case(name):
    """(apply_fn, params, x)."""
    if name in BUILTIN:
        cfg, shape = BUILTIN[name]
        model = models.create_model(cfg, 4)
        x = jax.random.normal(jax.random.key(4), shape)
        params = _perturb(model.init(KEY, x)["params"], 0.05, 1)  # biases off exact zero
        return (lambda p, x: model.apply({"params": p}, x)), params, x
    if name == "plain":
        return plain_mlp, _plain_params(), jax.random.normal(jax.random.key(5), (6, 5))
    if name == "nnx":
        apply_fn, params = rj.nnx_apply(NNXNet(nnx.Rngs(0)))
        return apply_fn, params, jax.random.normal(jax.random.key(6), (5, 8, 8, 1))
    if name == "scan_remat":
        model, x = ScanRemat(), jax.random.normal(jax.random.key(7), (5, 4, 6))
        return (lambda p, x: model.apply({"params": p}, x)), model.init(KEY, x)["params"], x
    raise KeyError(name)


CASES = [*sorted(BUILTIN), "plain", "nnx", "scan_remat"]


# ----------------------------------------------------------------------------- F = current step
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_gates_equal_to_values_give_the_network_bit_for_bit(name, mode):
    apply_fn, params, x = _case(name)
    gated = rj.gate_relus(apply_fn)
    captured = rj.capture_relus(apply_fn)
    if mode == "jit":
        apply_fn, gated, captured = jax.jit(apply_fn), jax.jit(gated), jax.jit(captured)
    out, z_values, z_gates = gated(params, params, x)
    _assert_bit_equal(out, apply_fn(params, x), name)
    _, preacts = captured(params, x)
    assert list(z_values) == list(z_gates) == list(preacts) and preacts
    _assert_bit_equal(z_values, preacts, name)
    _assert_bit_equal(z_gates, preacts, name)
    for z in z_values.values():  # not vacuous: both sides of every unit are met
        assert bool(jnp.any(z > 0)) and bool(jnp.any(z < 0))


@pytest.mark.parametrize(
    "act",
    [jax.nn.relu, lambda z: jnp.maximum(z, 0.0), lambda z: jnp.maximum(0.0, z)],
    ids=["nn.relu", "maximum(z, 0)", "maximum(0, z)"],
)
@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_negative_zero_and_nan_are_bit_identical_to_relu(act, mode):
    z = jnp.array([-0.0, 0.0, jnp.nan, -jnp.nan, -1.0, 2.0, -jnp.inf, jnp.inf, 1e-45, -1e-45])
    fn = lambda p, x: act(x * p)  # z = x exactly (p = 1)
    gated = rj.gate_relus(fn)
    if mode == "jit":
        fn, gated = jax.jit(fn), jax.jit(gated)
    out, _, _ = gated(jnp.float32(1), jnp.float32(1), z)
    _assert_bit_equal(out, fn(jnp.float32(1), z))
    # why the gated unit is not written where(z_g > 0, z_v, 0): a NaN would become 0
    assert np.isnan(out[2]) and float(jnp.where(z[2] > 0, z[2], 0.0)) == 0.0


# ----------------------------------------------------------------------------- other gates
def _gated_mlp_by_hand(v, g, x):
    """The gated plain MLP in jnp: h_v = z_v * (z_g > 0), h_g = relu(z_g)."""
    h_v, h_g, zs_v, zs_g = x, x, [], []
    for (wv, bv), (wg, bg) in zip(v[:-1], g[:-1], strict=True):
        z_v, z_g = h_v @ wv + bv, h_g @ wg + bg
        zs_v.append(z_v)
        zs_g.append(z_g)
        h_v, h_g = z_v * (z_g > 0), jnp.maximum(z_g, 0.0)
    w, b = v[-1]
    return h_v @ w + b, zs_v, zs_g


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_value_stream_is_z_values_times_gate_bit(mode):
    values, gates = _plain_params(seed=0), _plain_params(seed=1)
    x = jax.random.normal(jax.random.key(5), (6, 5))
    gated = rj.gate_relus(plain_mlp)
    gated = jax.jit(gated) if mode == "jit" else gated
    out, z_values, z_gates = gated(values, gates, x)
    out_ref, zs_v, zs_g = _gated_mlp_by_hand(values, gates, x)
    assert list(z_values) == ["0", "1"]  # named after the kernels: params[0], params[1]
    disagree = gating.disagreement(z_values, z_gates)
    assert 0.1 < float(disagree["all"]) < 0.9  # the gates really switch other units
    for name, z_v, z_g in zip(z_values, zs_v, zs_g, strict=True):
        np.testing.assert_allclose(z_values[name], z_v, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(z_gates[name], z_g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-6)


def test_builtin_mlp_gated_by_hand():
    apply_fn, values, x = _case("mlp")
    gates = _perturb(values, 0.3, 2)
    out, z_values, z_gates = gating.gated_net(lambda p, x: apply_fn(p, x)).preacts_fn(
        values, gates, x
    )
    h_v, h_g = x, x
    for layer in ("fc1", "fc2"):
        z_v = h_v @ values[layer]["kernel"] + values[layer]["bias"]
        z_g = h_g @ gates[layer]["kernel"] + gates[layer]["bias"]
        np.testing.assert_allclose(z_values[layer], z_v, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(z_gates[layer], z_g, rtol=1e-5, atol=1e-5)
        h_v, h_g = z_v * (z_g > 0), jnp.maximum(z_g, 0)
    head = h_v @ values["head"]["kernel"] + values["head"]["bias"]
    np.testing.assert_allclose(out, head, rtol=1e-5, atol=1e-5)


def test_scan_pairs_carries_and_shares_xs():
    """lax.scan over checkpointed steps: the carry runs paired, the scanned x is shared."""

    shift = jax.random.normal(jax.random.key(4), (3, 1, 5))  # a per-step constant, shared

    def fn(p, x):
        def step(h, wt):
            w, t = wt
            return jax.nn.relu(h @ w + t), None

        h, _ = jax.lax.scan(jax.checkpoint(step), x, (p, shift))
        return h.sum(-1)

    x = jax.random.normal(jax.random.key(1), (3, 5))  # 3 examples: the initial state
    values = jax.random.normal(jax.random.key(2), (3, 5, 5))
    gates = values + 0.5 * jax.random.normal(jax.random.key(3), (3, 5, 5))
    out, z_values, z_gates = rj.gate_relus(fn)(values, gates, x)
    assert list(z_values) == ["relu_0[0]", "relu_0[1]", "relu_0[2]"]
    h_v = h_g = x
    for i in range(3):
        z_v, z_g = h_v @ values[i] + shift[i], h_g @ gates[i] + shift[i]
        np.testing.assert_allclose(z_values[f"relu_0[{i}]"], z_v, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(z_gates[f"relu_0[{i}]"], z_g, rtol=1e-5, atol=1e-5)
        h_v, h_g = z_v * (z_g > 0), jnp.maximum(z_g, 0)
    np.testing.assert_allclose(out, h_v.sum(-1), rtol=1e-5, atol=1e-5)
    _assert_bit_equal(rj.gate_relus(fn)(values, values, x)[0], fn(values, x))


def test_custom_vjp_nested_jit_and_checkpoint_are_gated():
    @jax.custom_vjp
    def straight_through(z):
        return jnp.maximum(z, 0.0)

    straight_through.defvjp(lambda z: (straight_through(z), None), lambda _, g: (g,))

    def fn(p, x):
        h = jax.jit(jax.nn.relu)(x @ p)
        h = jax.checkpoint(lambda z: jnp.maximum(0.0, z @ p + 0.5))(h)
        return straight_through(h @ p - 1.0)

    x = jax.random.normal(jax.random.key(1), (6, 3))
    values = jax.random.normal(jax.random.key(2), (3, 3))
    gates = values + jax.random.normal(jax.random.key(3), (3, 3))
    _assert_bit_equal(rj.gate_relus(fn)(values, values, x)[0], fn(values, x))
    out, z_values, z_gates = rj.gate_relus(fn)(values, gates, x)
    h_v, h_g = x, x
    for i, shift in enumerate((0.0, 0.5, -1.0)):
        z_v = h_v @ values + shift
        z_g = h_g @ gates + shift
        np.testing.assert_allclose(z_values[f"relu_{i}"], z_v, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(z_gates[f"relu_{i}"], z_g, rtol=1e-5, atol=1e-5)
        h_v, h_g = z_v * (z_g > 0), jnp.maximum(z_g, 0)
    np.testing.assert_allclose(out, h_v, rtol=1e-5, atol=1e-5)
    # the value stream is gated, so the straight-through rule gives way to the gate bit
    g = jax.grad(lambda v: rj.gate_relus(fn)(v, gates, x)[0].sum())(values)
    g_ref = jax.grad(lambda v: _three_gated(v, gates, x).sum())(values)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


def _three_gated(v, g, x):
    h_v, h_g = x, x
    for shift in (0.0, 0.5, -1.0):
        z_v, z_g = h_v @ v + shift, h_g @ g + shift
        h_v, h_g = jnp.where(z_g > 0, z_v, 0.0), jnp.maximum(z_g, 0)
    return h_v


# ----------------------------------------------------------------------------- gradients
def test_gradients_reach_values_only():
    values, gates = _plain_params(seed=0), _plain_params(seed=1)
    x = jax.random.normal(jax.random.key(5), (6, 5))
    gated = rj.gate_relus(plain_mlp)
    loss = lambda v, g: jnp.sum(gated(v, g, x)[0] ** 2)
    g_values, g_gates = jax.jit(jax.grad(loss, argnums=(0, 1)))(values, gates)
    assert all(not bool(jnp.any(leaf)) for leaf in jax.tree.leaves(g_gates))
    ref = jax.grad(lambda v: jnp.sum(_gated_mlp_by_hand(v, gates, x)[0] ** 2))(values)
    for a, b in zip(jax.tree.leaves(g_values), jax.tree.leaves(ref), strict=True):
        assert bool(jnp.any(a))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # F = current step: the gated gradient is the ordinary ReLU gradient
    g_now = jax.grad(lambda v: jnp.sum(gated(v, values, x)[0] ** 2))(values)
    g_plain = jax.grad(lambda v: jnp.sum(plain_mlp(v, x) ** 2))(values)
    for a, b in zip(jax.tree.leaves(g_now), jax.tree.leaves(g_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["transformer", "scan_remat", "nnx"])
def test_gradient_at_the_current_step_is_the_ordinary_gradient(name):
    """gates == values: d/dvalues of the gated loss is the network's own (paired scan, remat)."""
    apply_fn, params, x = _case(name)
    gated = rj.gate_relus(apply_fn)
    loss = lambda out: jnp.sum(jnp.sin(out))
    g_gated = jax.jit(jax.grad(lambda v: loss(gated(v, params, x)[0])))(params)
    g_plain = jax.jit(jax.grad(lambda v: loss(apply_fn(v, x))))(params)
    for a, b in zip(jax.tree.leaves(g_gated), jax.tree.leaves(g_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_gated_fn_vmaps_over_examples():
    apply_fn, values, x = _case("mlp")
    gates = _perturb(values, 0.3, 2)
    gated = rj.gate_relus(apply_fn)
    out, z_values, z_gates = jax.vmap(lambda xi: gated(values, gates, xi[None]))(x)
    ref_out, ref_v, ref_g = gated(values, gates, x)
    np.testing.assert_allclose(out[:, 0], ref_out, rtol=1e-5, atol=1e-6)
    for k in ref_v:
        np.testing.assert_allclose(z_values[k][:, 0], ref_v[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(z_gates[k][:, 0], ref_g[k], rtol=1e-5, atol=1e-6)


def test_gates_get_no_gradient_even_at_a_tie():
    """At z_g == 0 max's derivative is 1/2: only stop_gradient keeps it from the gates."""
    fn = lambda p, x: jnp.maximum(x @ p["w"] + p["b"], 0.0).sum()
    values = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    gates = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    x = jnp.zeros((4, 2))  # z_g = 0 exactly: every gate is off, at the kink
    g_values, g_gates = jax.grad(lambda v, g: rj.gate_relus(fn)(v, g, x)[0], (0, 1))(values, gates)
    assert all(not bool(jnp.any(leaf)) for leaf in jax.tree.leaves(g_gates))
    assert all(not bool(jnp.any(leaf)) for leaf in jax.tree.leaves(g_values))  # all off
    assert float(jax.grad(lambda g: fn(g, x))(gates)["b"][0]) == 2.0  # 4 examples x 1/2


def test_gated_network_is_linear_in_one_layer_of_values():
    """Gates held, a bias-free gated MLP is linear in each weight matrix (a ReLU net is not)."""
    fn = lambda p, x: jax.nn.relu(jax.nn.relu(x @ p[0]) @ p[1]) @ p[2]
    keys = jax.random.split(KEY, 4)
    shapes = [(5, 8), (8, 8), (8, 2)]
    values = [jax.random.normal(k, s) for k, s in zip(keys[:3], shapes, strict=True)]
    gates = _perturb(values, 0.1, 3)
    x = jax.random.normal(keys[3], (6, 5))
    gated = rj.gate_relus(fn)
    for layer in range(3):
        scaled = [-2.0 * w if i == layer else w for i, w in enumerate(values)]
        np.testing.assert_allclose(
            gated(scaled, gates, x)[0], -2.0 * gated(values, gates, x)[0], rtol=1e-5, atol=1e-5
        )
    assert not np.allclose(fn([-2.0 * values[0], *values[1:]], x), -2.0 * fn(values, x))


# ----------------------------------------------------------------------------- jit
def test_gated_step_traces_once():
    apply_fn, values, x = _case("mlp")
    net = gating.gated_net(apply_fn)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(values, gates, x):
        loss = lambda v: jnp.mean(net.apply(v, gates, x) ** 2)
        grads = jax.grad(loss)(values)
        _, z_values, z_gates = net.preacts_fn(values, gates, x)
        return jax.tree.map(lambda p, g: p - 0.1 * g, values, grads), (
            gating.disagreement_metrics(z_values, z_gates)
        )

    gates = values
    metrics = None
    for _ in range(3):
        values, metrics = step(values, gates, x)
    assert set(metrics) == {
        "decouple/disagree/fc1",
        "decouple/disagree/fc2",
        "decouple/disagree/all",
    }
    assert 0.0 < float(metrics["decouple/disagree/all"]) < 0.5  # values drifted off the gates


# ----------------------------------------------------------------------------- gated_net
def test_gated_net_takes_linen_nnx_net_and_functions():
    x = jax.random.normal(KEY, (4, 10))
    linen = models.create_model(BUILTIN["mlp"][0], 3)
    params = linen.init(KEY, x)["params"]
    out = gating.gated_net(linen).apply(params, params, x)
    _assert_bit_equal(out, linen.apply({"params": params}, x))
    module = nnx.Sequential(nnx.Linear(10, 6, rngs=nnx.Rngs(0)), nnx.relu)
    apply_fn, nparams = rj.nnx_apply(module)
    for model in (module, rj.Net(lambda k, x: nparams, apply_fn, rj.capture_relus(apply_fn))):
        _assert_bit_equal(gating.gated_net(model).apply(nparams, nparams, x), module(x))


# ----------------------------------------------------------------------------- disagreement
def test_disagreement_is_zero_for_gates_equal_to_values():
    apply_fn, params, x = _case("transformer")
    _, z_values, z_gates = rj.gate_relus(apply_fn)(params, params, x)
    rates = gating.disagreement(z_values, z_gates)
    assert set(rates) == {*z_values, "all"}
    assert all(float(r) == 0.0 for r in rates.values())


@pytest.mark.parametrize("jit", [False, True])
def test_disagreement_counts_by_hand(jit):
    # layer a: [2 probe, 3 units], 1 differing bit (exact zero is off: 0.0 vs 1e-3 differs)
    z_v = {"a": jnp.array([[1.0, -1.0, 0.0], [2.0, 2.0, -3.0]])}
    z_g = {"a": jnp.array([[1.0, -2.0, 1e-3], [5.0, 0.5, -1.0]])}
    # layer b: [2 probe, 2 positions, 9 units] (a padded byte), 4 differing bits
    v_b = -jnp.ones((2, 2, 9))
    g_b = v_b.at[0, 0, 8].set(1.0).at[1, 1, 0].set(1.0).at[1, 0, 4].set(2.0).at[0, 1, 7].set(3.0)
    z_v["b"], z_g["b"] = v_b, g_b
    fn = jax.jit(gating.disagreement_metrics) if jit else gating.disagreement_metrics
    got = {k: float(v) for k, v in fn(z_v, z_g).items()}
    assert got == pytest.approx(
        {
            "decouple/disagree/a": 1 / 6,
            "decouple/disagree/b": 4 / 36,
            "decouple/disagree/all": 5 / 42,
        }
    )


def test_disagreement_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no ReLU layer"):
        gating.disagreement({}, {})
    with pytest.raises(ValueError, match="no bits"):
        gating.disagreement({"a": jnp.zeros((0, 4))}, {"a": jnp.zeros((0, 4))})
    with pytest.raises(ValueError, match="layers"):
        gating.disagreement({"a": jnp.ones((2, 4))}, {"b": jnp.ones((2, 4))})
    with pytest.raises(ValueError, match="shape"):
        gating.disagreement({"a": jnp.ones((2, 4))}, {"a": jnp.ones((3, 4))})


# ----------------------------------------------------------------------------- refusals
def test_gate_relus_refuses_what_capture_refuses_and_mismatched_gates():
    p, x = jnp.ones((3, 3)), jnp.ones((2, 3))
    with pytest.raises(rj.CaptureError, match="no ReLU found"):
        rj.gate_relus(lambda p, x: jnp.tanh(x @ p))(p, p, x)
    cond = lambda p, x: jax.lax.cond(x.sum() > 0, jax.nn.relu, jnp.tanh, x @ p)
    with pytest.raises(rj.CaptureError, match=r"lax\.cond"):
        rj.gate_relus(cond)(p, p, x)
    loop = lambda p, x: jax.lax.while_loop(
        lambda c: c[0] < 3, lambda c: (c[0] + 1, jax.nn.relu(c[1] @ p)), (0, x)
    )[1]
    with pytest.raises(rj.CaptureError, match=r"lax\.while_loop"):
        rj.gate_relus(loop)(p, p, x)
    with pytest.raises(ValueError, match=r"gates\['w'\] has \(shape, dtype\)"):
        rj.gate_relus(lambda p, x: jax.nn.relu(x @ p["w"]))({"w": p}, {"w": p[:2]}, x)
    with pytest.raises(ValueError, match="tree like values"):
        rj.gate_relus(lambda p, x: jax.nn.relu(x @ p["w"]))({"w": p}, {"v": p}, x)
    with pytest.raises(TypeError, match=r"gate_relus takes apply_fn\(params, x\)"):
        rj.gate_relus(NNXNet(nnx.Rngs(0)))


def test_gate_relus_passes_keyword_arguments_and_shares_dropout():
    class DropNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            h = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(16, name="fc")(x)))
            return nn.Dense(2, name="out")(h)

    model, x = DropNet(), jax.random.normal(KEY, (5, 3))
    v = model.init(KEY, x, train=False)
    rngs = {"dropout": jax.random.key(9)}
    out, _, _ = rj.gate_relus(model.apply)(v, v, x, train=True, rngs=rngs)
    _assert_bit_equal(out, model.apply(v, x, train=True, rngs=rngs))
