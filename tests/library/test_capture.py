"""capture_relus on models this project did not write: masks equal z > 0 computed by hand.

Every model here is written as its author would (nn.relu, jnp.maximum, NNX, nn.scan over
nn.remat), never through regime_jax's recording site. Each check runs eagerly, under
``jax.jit`` and under ``jax.vmap``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BUILTIN
from flax import nnx

import regime_jax as rj
from regime_jax import models

KEY = jax.random.key(0)


# ----------------------------------------------------------------------------- user models
class LinenMLP(nn.Module):
    """A plain linen MLP: nn.relu, Dense layers named by the author."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16, name="a")(x))
        h = nn.relu(nn.Dense(12, name="b")(h))
        return nn.Dense(3, name="out")(h)


class MaximumMLP(nn.Module):
    """ReLUs written as jnp.maximum, with the zero on either side; a LayerNorm in between."""

    @nn.compact
    def __call__(self, x):
        h = jnp.maximum(nn.Dense(16, name="a")(x), 0.0)
        h = nn.LayerNorm(name="ln")(h)  # its variance clamp max(0, var) is not a ReLU
        h = jnp.maximum(0.0, nn.Dense(12, name="b")(h))
        return nn.Dense(3, name="out")(h)


class NNXCNN(nnx.Module):
    """An NNX CNN as in the Flax NNX docs."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(4, 6, kernel_size=(3, 3), rngs=rngs)
        self.linear1 = nnx.Linear(6 * 2 * 2, 10, rngs=rngs)
        self.linear2 = nnx.Linear(10, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.conv1(x)), window_shape=(2, 2), strides=(2, 2))
        x = nnx.avg_pool(nnx.relu(self.conv2(x)), window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        return self.linear2(nnx.relu(self.linear1(x)))

    def preacts_by_hand(self, x):
        z1 = self.conv1(x)
        z2 = self.conv2(nnx.avg_pool(jnp.maximum(z1, 0), (2, 2), strides=(2, 2)))
        h = nnx.avg_pool(jnp.maximum(z2, 0), (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)
        return [z1, z2, self.linear1(h)]


class Block(nn.Module):
    """A pre-LN Transformer block with a ReLU FFN, written for nn.scan (carry, _)."""

    dim: int = 8
    hidden: int = 16

    @nn.compact
    def __call__(self, x, _):
        y = nn.LayerNorm(name="ln1")(x)
        x = x + nn.SelfAttention(num_heads=2, qkv_features=self.dim, name="attn")(y)
        y = nn.LayerNorm(name="ln2")(x)
        h = nn.relu(nn.Dense(self.hidden, name="fc1")(y))
        return x + nn.Dense(self.dim, name="fc2")(h), None


class ScanTransformer(nn.Module):
    """Embedding, then nn.scan over nn.remat(Block): one set of stacked block params."""

    num_layers: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="embed")(x)
        blocks = nn.scan(
            nn.remat(Block),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.num_layers,
        )
        x, _ = blocks(name="blocks")(x, None)
        return nn.Dense(3, name="head")(x.mean(1))


def _linen_reference(model, variables, x, layers):
    """z of each named Dense from linen's own capture_intermediates."""
    _, state = model.apply(variables, x, capture_intermediates=True)
    inter = state["intermediates"]
    return [inter[name]["__call__"][0] for name in layers]


def _scan_reference(model, variables, x):
    """z of every block's fc1, block by block, with the stacked params sliced by hand."""
    p = variables["params"]
    h = nn.Dense(8).apply({"params": p["embed"]}, x)
    out = []
    for i in range(model.num_layers):
        p_i = jax.tree.map(lambda a, i=i: a[i], p["blocks"])
        (h, _), state = Block().apply({"params": p_i}, h, None, capture_intermediates=True)
        out.append(state["intermediates"]["fc1"]["__call__"][0])
    return out


def _case(name):
    x2 = jax.random.normal(jax.random.key(1), (6, 5))
    if name == "linen_relu":
        model = LinenMLP()
        v = model.init(KEY, x2)
        return model.apply, v, x2, ["a", "b"], lambda: _linen_reference(model, v, x2, "ab")
    if name == "linen_maximum":
        model = MaximumMLP()
        v = model.init(KEY, x2)
        return model.apply, v, x2, ["a", "b"], lambda: _linen_reference(model, v, x2, "ab")
    if name == "nnx_cnn":
        x = jax.random.normal(jax.random.key(2), (6, 8, 8, 1))
        model = NNXCNN(nnx.Rngs(0))
        apply_fn, params = rj.nnx_apply(model)
        names = ["conv1", "conv2", "linear1"]  # no name stack: named after the kernels' module
        return apply_fn, params, x, names, lambda: model.preacts_by_hand(x)
    if name == "linen_scan_remat":
        x = jax.random.normal(jax.random.key(3), (6, 4, 5))
        model = ScanTransformer()
        v = model.init(KEY, x)
        names = [f"blocks/fc1[{i}]" for i in range(3)]
        return model.apply, v, x, names, lambda: _scan_reference(model, v, x)
    raise KeyError(name)


USER_CASES = ["linen_relu", "linen_maximum", "nnx_cnn", "linen_scan_remat"]


@pytest.mark.parametrize("name", USER_CASES)
@pytest.mark.parametrize("mode", ["eager", "jit", "vmap"])
def test_captured_masks_equal_z_positive_by_hand(name, mode):
    apply_fn, params, x, names, reference = _case(name)
    preacts_fn = rj.capture_relus(apply_fn)
    if mode == "eager":
        out, preacts = preacts_fn(params, x)
    elif mode == "jit":
        out, preacts = jax.jit(preacts_fn)(params, x)
    else:  # one example at a time: [P, 1, ...] -> [P, ...]
        out, preacts = jax.vmap(lambda xi: preacts_fn(params, xi[None]))(x)
        out = out[:, 0]
        preacts = {k: z[:, 0] for k, z in preacts.items()}
    assert list(preacts) == names
    for layer, z_ref in zip(names, reference(), strict=True):
        np.testing.assert_array_equal(rj.bitmask.active(preacts[layer]), np.asarray(z_ref) > 0)
        np.testing.assert_allclose(preacts[layer], z_ref, rtol=1e-5, atol=1e-6)
    expect = jax.jit(apply_fn)(params, x) if mode == "jit" else apply_fn(params, x)
    if mode == "vmap":
        np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-6)
    else:  # the instrumented function's output is the user's, bit for bit
        np.testing.assert_array_equal(out, expect)


# ----------------------------------------------------------------------------- built-in models


@pytest.mark.parametrize("family", sorted(BUILTIN))
@pytest.mark.parametrize("mode", ["eager", "jit", "vmap"])
def test_builtin_models_capture_equals_site(family, mode):
    cfg, shape = BUILTIN[family]
    model = models.create_model(cfg, 4)
    x = jax.random.normal(jax.random.key(4), shape)
    params = model.init(KEY, x)["params"]
    # The bias init is zero: move it so that bits are not all decided by exact zeros.
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(KEY, p.shape), params)
    captured = rj.capture_relus(lambda p, x: model.apply({"params": p}, x))
    site = models.site_preacts_fn(model)
    if mode == "jit":
        captured, site = jax.jit(captured), jax.jit(site)
    if mode == "vmap":
        captured = jax.vmap(captured, in_axes=(None, 0))
        site = jax.vmap(site, in_axes=(None, 0))
        x = x[:, None]
    out_c, pre_c = captured(params, x)
    out_s, pre_s = site(params, x)
    assert list(pre_c) == list(pre_s)
    for layer in pre_s:
        np.testing.assert_array_equal(
            rj.bitmask.active(pre_c[layer]), rj.bitmask.active(pre_s[layer]), err_msg=layer
        )
    np.testing.assert_array_equal(out_c, out_s)


# ----------------------------------------------------------------------------- names and kwargs
def test_names_are_stable_and_follow_the_documented_rule():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(4, name="shared")
            h = nn.relu(dense(x))
            h = nn.relu(dense(h))  # the same producer twice: second gets "#1"
            h = nn.relu(h @ self.param("w", nn.initializers.ones, (4, 4)))  # root scope: "w"
            h = h + nn.relu(x - 1.0)  # root scope, on the input itself (no kernel): ordinal
            return h

    model, x = Net(), jnp.ones((2, 4))
    v = model.init(KEY, x)
    preacts_fn = rj.capture_relus(model.apply)
    expected = ["shared", "shared#1", "w", "relu_3"]
    assert list(preacts_fn(v, x)[1]) == expected
    # every trace, same names (jit returns a dict's keys sorted, as for any pytree)
    assert sorted(jax.jit(preacts_fn)(v, 2 * x)[1]) == sorted(expected)


def test_plain_jax_names_follow_the_kernels_path_in_trace_order():
    """No name stack: a site is named after the parameter path of the kernel that produced
    it (so ``flip/<name>`` meets ``step/abs/<name>``), else ``relu_<k>``."""

    def apply_fn(params, x):
        h = x
        for w in params:
            h = jax.nn.relu(h @ w)
        return h + jax.nn.relu(x - 1.0)

    params = [jnp.ones((3, 3)), -jnp.ones((3, 3)), jnp.eye(3)]
    _, preacts = rj.capture_relus(apply_fn)(params, jnp.ones((2, 3)))
    assert list(preacts) == ["0", "1", "2", "relu_3"]
    np.testing.assert_array_equal(preacts["1"], -9 * jnp.ones((2, 3)))  # relu(3s) @ -1s
    nested = {"enc": {"fc1": {"w": jnp.ones((3, 3))}}, "head": {"w": jnp.ones((3, 2))}}
    fn = lambda p, x: jax.nn.relu(jax.nn.relu(x @ p["enc"]["fc1"]["w"]) @ p["head"]["w"])
    assert list(rj.capture_relus(fn)(nested, jnp.ones((2, 3)))[1]) == ["enc/fc1", "head"]


def test_keyword_arguments_and_batch_stats_pass_through():
    class BNNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            h = nn.Dense(8, name="fc")(x)
            h = nn.BatchNorm(use_running_average=not train, name="bn")(h)
            h = nn.Dropout(0.5, deterministic=not train)(nn.relu(h))
            return nn.Dense(2, name="out")(h)

    model, x = BNNet(), jax.random.normal(KEY, (6, 3))
    v = model.init(KEY, x, train=False)
    v = {
        "params": v["params"],
        "batch_stats": {"bn": {"mean": jnp.ones(8), "var": 2 * jnp.ones(8)}},
    }
    out, preacts = jax.jit(rj.capture_relus(model.apply), static_argnames="train")(
        v, x, train=False
    )
    assert list(preacts) == ["bn"]  # z is the BatchNorm output, produced by "bn"
    _, state = model.apply(v, x, train=False, capture_intermediates=True)
    np.testing.assert_array_equal(preacts["bn"], state["intermediates"]["bn"]["__call__"][0])
    np.testing.assert_array_equal(out, model.apply(v, x, train=False))


# ----------------------------------------------------------------------------- refusals
def test_no_relu_is_a_clear_error_everywhere():
    apply_fn = lambda p, x: jnp.tanh(x @ p)
    params, x = jnp.ones((3, 3)), jnp.ones((4, 3))
    with pytest.raises(rj.CaptureError, match=r"no ReLU found.*jnp\.maximum"):
        rj.capture_relus(apply_fn)(params, x)
    with pytest.raises(ValueError, match="no ReLU found"):
        rj.pattern_monitor(rj.capture_relus(apply_fn), x).init(params)
    with pytest.raises(ValueError, match="no ReLU found"):
        rj.stability.perturb(rj.capture_relus(apply_fn), params, x, KEY)
    with pytest.raises(ValueError, match="no ReLU found"):  # relu6 has a second kink
        rj.capture_relus(lambda p, x: jax.nn.relu6(x @ p))(params, x)


@pytest.mark.parametrize(
    ("fn", "construct"),
    [
        (lambda p, x: jax.lax.cond(x.sum() > 0, jax.nn.relu, jnp.tanh, x @ p), "lax.cond"),
        (lambda p, x: jax.lax.switch(0, [jax.nn.relu, jnp.tanh], x @ p), "lax.cond"),
        (
            lambda p, x: jax.lax.while_loop(
                lambda c: c[0] < 3, lambda c: (c[0] + 1, jax.nn.relu(c[1] @ p)), (0, x)
            )[1],
            "lax.while_loop",
        ),
    ],
)
def test_relu_inside_cond_or_while_is_refused_by_name(fn, construct):
    with pytest.raises(rj.CaptureError, match=construct):
        rj.capture_relus(fn)(jnp.ones((3, 3)), jnp.ones((2, 3)))


def test_cond_without_relu_is_evaluated_unchanged():
    def fn(p, x):
        h = jax.nn.relu(x @ p)
        return jax.lax.cond(h.sum() > 0, jnp.tanh, jnp.sin, h)

    p, x = jnp.ones((3, 3)), jnp.ones((2, 3))
    out, preacts = rj.capture_relus(fn)(p, x)
    assert list(preacts) == ["relu_0"]
    np.testing.assert_array_equal(out, fn(p, x))


def test_unknown_primitive_holding_a_relu_is_refused_with_jax_version():
    @jax.custom_batching.custom_vmap
    def act(z):
        return jax.nn.relu(z)

    act.def_vmap(lambda axis_size, in_batched, z: (jax.nn.relu(z), True))
    with pytest.raises(rj.CaptureError, match=rf"custom_vmap_call.*jax {jax.__version__}"):
        rj.capture_relus(lambda p, x: act(x @ p))(jnp.ones((3, 3)), jnp.ones((2, 3)))


def test_custom_vjp_checkpoint_and_nested_jit_are_seen_through():
    @jax.custom_vjp
    def straight_through(z):
        return jnp.maximum(z, 0.0)

    straight_through.defvjp(lambda z: (straight_through(z), None), lambda _, g: (g,))

    def fn(p, x):
        h = jax.jit(lambda z: jax.nn.relu(z))(x @ p)
        h = jax.checkpoint(lambda z: jnp.maximum(0.0, z @ p + 0.5))(h)
        return straight_through(h @ p - 1.0)

    p, x = jnp.eye(3), jnp.arange(6.0).reshape(2, 3) - 2
    out, preacts = rj.capture_relus(fn)(p, x)
    assert list(preacts) == ["relu_0", "relu_1", "relu_2"]
    np.testing.assert_array_equal(preacts["relu_1"], jnp.maximum(x @ p, 0) @ p + 0.5)
    np.testing.assert_array_equal(out, fn(p, x))
    # the user's custom derivative rule is kept (straight-through: gradient 1 everywhere)
    g = jax.grad(lambda p: rj.capture_relus(fn)(p, x)[0].sum())(p)
    np.testing.assert_array_equal(g, jax.grad(lambda p: fn(p, x).sum())(p))


class NNXBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return x + self.fc2(nnx.relu(self.fc1(x)))


class NNXScanStack(nnx.Module):
    """Layers stacked with nnx.vmap and run with nnx.scan over nnx.remat, as in the NNX docs."""

    def __init__(self, rngs: nnx.Rngs, num_layers: int = 3):
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NNXBlock(rngs)

        self.blocks = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def step(x, block):
            return block(x)

        return step(x, self.blocks)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_nnx_scan_over_remat_keeps_every_iteration(mode):
    apply_fn, params = rj.nnx_apply(NNXScanStack(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (5, 8))
    preacts_fn = rj.capture_relus(apply_fn)
    out, preacts = (jax.jit(preacts_fn) if mode == "jit" else preacts_fn)(params, x)
    assert sorted(preacts) == ["fc1[0]", "fc1[1]", "fc1[2]"]  # as step/abs/fc1
    np.testing.assert_array_equal(
        out, apply_fn(params, x) if mode == "eager" else jax.jit(apply_fn)(params, x)
    )
    h = x
    for i in range(3):  # the same stack by hand, layer i's params sliced from the stack
        blk = jax.tree.map(lambda a, i=i: a[i], params["blocks"])
        z = h @ blk["fc1"]["kernel"] + blk["fc1"]["bias"]
        np.testing.assert_array_equal(preacts[f"fc1[{i}]"] > 0, z > 0)
        h = h + jnp.maximum(z, 0) @ blk["fc2"]["kernel"] + blk["fc2"]["bias"]


def test_module_objects_are_refused_with_the_function_to_pass():
    with pytest.raises(TypeError, match=r"pass model\.apply"):
        rj.capture_relus(LinenMLP())
    with pytest.raises(TypeError, match=r"rj\.nnx_apply\(module\)\[0\]"):
        rj.capture_relus(NNXCNN(nnx.Rngs(0)))


def test_site_reader_refuses_a_model_without_sites():
    model, x = LinenMLP(), jnp.ones((2, 5))
    params = model.init(KEY, x)["params"]
    with pytest.raises(ValueError, match=r"no recording site.*capture_relus"):
        models.preacts_of(model, params, x)


def test_public_api_is_the_curated_list_and_loads_lazily():
    import subprocess
    import sys

    names = set(rj.__all__) - {"__version__"}
    assert names == set(rj._API)
    for name in names:
        assert getattr(rj, name) is not None
    code = "import sys, regime_jax; print('jax' in sys.modules, regime_jax.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", rj.__version__]  # CLI signal handlers come first
