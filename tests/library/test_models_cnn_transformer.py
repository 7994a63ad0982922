"""CNN and Transformer: what they record, that recording is free, and config validation."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from regime_jax.models import (
    CNN,
    PREACTS,
    Transformer,
    create_model,
    patterns_of,
    preacts_of,
)

B, MLP_DIM = 3, 24


def _tf(**kw):
    cfg = dict(num_layers=2, num_heads=2, dim=16, mlp_dim=MLP_DIM, num_classes=5, embed="scalar")
    return Transformer(**{**cfg, **kw})


# (id, model, input shape, expected {layer: shape})
CASES = [
    (
        "cnn2d",
        CNN(dims=2, channels=(8, 16), dense=(32,), num_classes=5),
        (B, 8, 8, 1),
        {"conv1": (B, 8, 8, 8), "conv2": (B, 4, 4, 16), "fc1": (B, 32)},
    ),
    (
        "cnn2d_no_channel_axis_avg_layernorm",
        CNN(dims=2, channels=(8, 16), dense=(32,), num_classes=5, pool="avg", norm="layer"),
        (B, 8, 8),
        {"norm1": (B, 8, 8, 8), "norm2": (B, 4, 4, 16), "fc1": (B, 32)},
    ),
    (
        "cnn1d",
        CNN(dims=1, channels=(8, 16), dense=(32,), num_classes=5),
        (B, 40),
        {"conv1": (B, 40, 8), "conv2": (B, 20, 16), "fc1": (B, 32)},
    ),
    (
        "cnn1d_strided_nopool_two_dense",
        CNN(dims=1, channels=(4,), strides=2, pool="none", dense=(16, 8), num_classes=5),
        (B, 40, 2),
        {"conv1": (B, 20, 4), "fc1": (B, 16), "fc2": (B, 8)},
    ),
    (
        "cnn2d_pooling_skipped_when_too_small",
        CNN(dims=2, channels=(4, 4, 4), dense=(), num_classes=5),
        (B, 2, 2, 1),
        {"conv1": (B, 2, 2, 4), "conv2": (B, 1, 1, 4), "conv3": (B, 1, 1, 4)},
    ),
    (
        "tf_scalar_mean",
        _tf(),
        (B, 40),
        {"block0/ffn/fc1": (B, 40, MLP_DIM), "block1/ffn/fc1": (B, 40, MLP_DIM)},
    ),
    (
        "tf_scalar_cls_sinusoidal",
        _tf(pool="cls", positions="sinusoidal"),
        (B, 40, 1),
        {"block0/ffn/fc1": (B, 41, MLP_DIM), "block1/ffn/fc1": (B, 41, MLP_DIM)},
    ),
    (
        "tf_patch",
        _tf(embed="patch", patch_size=4),
        (B, 32, 32, 3),
        {"block0/ffn/fc1": (B, 64, MLP_DIM), "block1/ffn/fc1": (B, 64, MLP_DIM)},
    ),
]
IDS = [c[0] for c in CASES]


def _init(model, shape, seed=0):
    """Params with the model's own structure, drawn in numpy: ``model.init`` is only traced
    (``eval_shape``), which keeps the suite fast (compiling initializers dominates otherwise)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]

    def draw(path, leaf):
        name = path[-1].key
        if name == "scale":  # LayerNorm
            return jnp.ones(leaf.shape, leaf.dtype)
        fan_in = max(1, int(np.prod(leaf.shape[:-1]))) if name == "kernel" else 25
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes), x


@pytest.mark.parametrize(("name", "model", "shape", "expected"), CASES, ids=IDS)
def test_records_exactly_the_expected_layers(name, model, shape, expected):
    params, x = _init(model, shape)
    preacts = preacts_of(model, params, x)
    assert set(preacts) == set(expected), name
    chex.assert_trees_all_equal_shapes_and_dtypes(
        preacts, {k: jnp.zeros(s, jnp.float32) for k, s in expected.items()}
    )
    assert model.apply({"params": params}, x).shape == (B, 5)
    patterns = patterns_of(preacts)
    for key, z in preacts.items():
        np.testing.assert_array_equal(np.asarray(patterns[key]), np.asarray(z) > 0)
        assert 0 < np.asarray(patterns[key]).mean() < 1, key  # a live mix of on and off


@pytest.mark.parametrize(("name", "model", "shape", "expected"), CASES, ids=IDS)
def test_outputs_identical_with_and_without_recording(name, model, shape, expected):
    params, x = _init(model, shape)
    plain = model.apply({"params": params}, x)
    recorded, state = model.apply({"params": params}, x, mutable=[PREACTS])
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(recorded))
    assert set(state) == {PREACTS}


# One case per family (jit compiles are what make this suite slow).
@pytest.mark.parametrize("case", [1, 6], ids=[IDS[1], IDS[6]])
def test_jit_and_eager_preacts_agree(case):
    _, model, shape, _ = CASES[case]
    params, x = _init(model, shape)
    eager = preacts_of(model, params, x)
    jitted = jax.jit(lambda p, x: preacts_of(model, p, x))(params, x)
    chex.assert_trees_all_close(eager, jitted, atol=1e-6, rtol=1e-6)


def test_cnn_recorded_preact_is_what_the_head_sees():
    _, model, shape, _ = CASES[0]
    params, x = _init(model, shape)
    z = preacts_of(model, params, x)["fc1"]
    head = params["head"]
    expected = jnp.maximum(z, 0) @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(model.apply({"params": params}, x), expected, atol=1e-5)


def test_cnn_layer_norm_is_recorded_before_relu():
    _, model, shape, _ = CASES[1]
    assert model.norm == "layer"
    params, x = _init(model, shape)
    z = np.asarray(preacts_of(model, params, x)["norm1"]) - params["norm1"]["bias"]
    np.testing.assert_allclose(z.mean(-1), 0.0, atol=1e-5)  # normalized over channels
    np.testing.assert_allclose(z.var(-1), 1.0, atol=1e-2)


def test_ffn_recorded_preact_is_what_fc2_sees():
    model = _tf(pool="cls")
    params, x = _init(model, (B, 40))
    z = preacts_of(model, params, x)["block0/ffn/fc1"]
    _, state = model.apply(
        {"params": params}, x, capture_intermediates=True, mutable=["intermediates"]
    )
    (ffn_out,) = state["intermediates"]["block0"]["ffn"]["__call__"]
    fc2 = params["block0"]["ffn"]["fc2"]
    np.testing.assert_allclose(ffn_out, jnp.maximum(z, 0) @ fc2["kernel"] + fc2["bias"], atol=1e-5)


TF = dict(name="transformer", num_layers=1, num_heads=2, dim=8, mlp_dim=8, embed="scalar")
CN = dict(name="cnn", dims=2, channels=(4, 8))


def test_activation_outside_the_models_set_is_refused_at_construction_and_registration():
    # The Transformer's FFN takes relu | gelu | silu (recorded where the run opts in: issue 24
    # part 4, tests/library/test_capture_signs.py); the CNN stays ReLU-only.
    with pytest.raises(ValueError, match=r"model\.activation='tanh'.*gelu"):
        _tf(activation="tanh")
    with pytest.raises(ValueError, match=r"model\.activation='tanh'.*gelu"):
        create_model({**TF, "activation": "tanh"}, 10)
    assert create_model({**TF, "activation": "gelu"}, 10).activation == "gelu"
    with pytest.raises(ValueError, match=r"model\.activation='gelu'.*relu"):
        create_model({"name": "cnn", "dims": 1, "channels": (4,), "activation": "gelu"}, 10)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({**TF, "pool": "max"}, r"model\.pool='max' is unknown; allowed values: \['cls', 'mean'\]"),
        ({**TF, "embed": "token"}, r"model\.embed='token' is unknown.*\['patch', 'scalar'\]"),
        ({**TF, "positions": "rope"}, r"model\.positions='rope' is unknown.*'sinusoidal'"),
        ({**TF, "dim": 9}, r"model\.dim=9 must be divisible by model\.num_heads=2"),
        ({**TF, "mlp_dim": 0}, r"model\.mlp_dim must be a positive int"),
        ({**TF, "num_layers": -1}, r"model\.num_layers must be a positive int"),
        ({**TF, "patch_size": 0}, r"model\.patch_size must be a positive int"),
        ({k: v for k, v in TF.items() if k != "embed"}, r"model\.embed is required"),
        ({**CN, "pool": "foo"}, r"model\.pool='foo' is unknown; allowed values: \['avg', 'max',"),
        ({**CN, "norm": "batch"}, r"model\.norm='batch' is unknown.*\['layer', 'none'\]"),
        ({**CN, "dims": 3}, r"model\.dims=3 is unknown; allowed values: \[1, 2\]"),
        ({**CN, "channels": (4, 0)}, r"model\.channels must be a non-empty list"),
        ({**CN, "channels": ()}, r"model\.channels must be a non-empty list"),
        ({**CN, "dense": (0,)}, r"model\.dense must be a non-empty list"),
        ({**CN, "pool_size": 0}, r"model\.pool_size must be a positive int"),
        ({**CN, "kernel_size": 2.5}, r"model\.kernel_size must be a positive int"),
        ({**CN, "strides": 0}, r"model\.strides must be a positive int"),
    ],
)
def test_registry_refuses_bad_fields(cfg, message):
    with pytest.raises(ValueError, match=message):
        create_model(cfg, 10)


def _preact_shapes(model, params, x):
    """Recorded layers and shapes, by tracing only (no compile)."""
    shapes = jax.eval_shape(lambda p, x: preacts_of(model, p, x), params, x)
    return {k: v.shape for k, v in shapes.items()}


def test_registry_builds_from_plain_dict():
    cnn = create_model({**CN, "dense": ()}, 10)
    assert isinstance(cnn, CNN) and cnn.pool == "max" and cnn.kernel_size == 3
    assert cnn.dense == () and cnn.norm == "none" and cnn.pool_size == 2 and cnn.strides == 1
    params, x = _init(cnn, (B, 8, 8, 1))
    assert set(_preact_shapes(cnn, params, x)) == {"conv1", "conv2"}
    assert create_model(dict(CN), 10).dense == (128,)

    tf = create_model({**TF, "pool": "cls", "positions": "sinusoidal"}, 10)
    assert isinstance(tf, Transformer) and tf.patch_size == 4 and tf.activation == "relu"
    params, x = _init(tf, (B, 12))
    assert _preact_shapes(tf, params, x) == {"block0/ffn/fc1": (B, 13, 8)}
    assert jax.eval_shape(tf.apply, {"params": params}, x).shape == (B, 10)
    assert create_model(TF, 10).pool == "mean" and create_model(TF, 10).positions == "learned"


def test_patch_embed_refuses_non_multiple_sizes():
    model = _tf(embed="patch", patch_size=4)
    with pytest.raises(ValueError, match=r"multiples of model\.patch_size=4"):
        _init(model, (B, 30, 32, 3))
