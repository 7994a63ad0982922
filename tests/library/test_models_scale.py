"""ResNet (BatchNorm), GPT (causal, ReLU FFN), sequence targets, bfloat16 compute, and the
full-size configs traced on abstract inputs of their real shapes (no download)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

import regime_jax as rj
from regime_jax import analyzer, configs, data
from regime_jax.configs.base import ConfigError
from regime_jax.models import PREACTS, create_model, flatten_layers
from regime_jax.models.adapt import as_net
from regime_jax.run import loop, step

KEY = jax.random.key(0)
RESNET = {"name": "resnet", "stage_sizes": (1, 1), "width": 4}
GPT = {"name": "gpt", "num_layers": 2, "num_heads": 2, "dim": 16, "mlp_dim": 24, "context": 12}
VOCAB = 7


def _init(model, x, seed=0):
    """Variables with the model's own structure (params and, for the ResNet, batch_stats),
    drawn in numpy: ``model.init`` is only traced (``eval_shape``), which keeps the suite
    fast (compiling initializers dominates otherwise). Biases and running statistics are
    moved off their init, so that no bit is decided by an exact zero."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, KEY, x)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            scale = 1 / np.sqrt(max(1, int(np.prod(leaf.shape[:-1]))))
        elif name in ("scale", "var"):
            return jnp.asarray(1 + 0.1 * np.abs(rng.normal(size=leaf.shape)), leaf.dtype)
        else:  # biases, running means, embeddings, positions, the CLS token
            scale = 0.1 if name in ("bias", "mean") else 0.5
        return jnp.asarray(scale * rng.normal(size=leaf.shape), leaf.dtype)

    return {k: jax.tree_util.tree_map_with_path(draw, v) for k, v in shapes.items() if k != PREACTS}


def _images(n=6, seed=2):
    return jax.random.normal(jax.random.key(seed), (n, 8, 8, 1))


def _tokens(n=3, t=10, seed=3):
    return jax.random.randint(jax.random.key(seed), (n, t), 0, VOCAB)


def _site_preacts(model, variables, x):
    """The recording sites' pre-activations (eval mode for a model with ``train``), jitted."""

    def preacts(variables, x):
        _, state = model.apply(variables, x, mutable=[PREACTS])
        return flatten_layers(state[PREACTS])

    return jax.jit(preacts)(variables, x)


# ----------------------------------------------------------------------------- ResNet


def test_resnet18_records_every_relu_at_every_position():
    model = create_model({"name": "resnet"}, 10)  # the defaults: ResNet-18
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, KEY, x)
    assert set(variables) == {"params", "batch_stats", PREACTS}
    variables = {k: variables[k] for k in ("params", "batch_stats")}
    preacts = jax.eval_shape(functools.partial(_site_preacts, model), variables, x)
    expected = {"stem_bn": (2, 32, 32, 64)}
    for s, (side, width) in enumerate([(32, 64), (16, 128), (8, 256), (4, 512)], start=1):
        for b in range(2):
            expected[f"stage{s}_block{b}/bn1"] = expected[f"stage{s}_block{b}"] = (
                2,
                side,
                side,
                width,
            )
    assert {k: v.shape for k, v in preacts.items()} == expected  # 17 layers
    n_params = sum(a.size for a in jax.tree.leaves(variables["params"]))
    assert 11.1e6 < n_params < 11.3e6, n_params  # ResNet-18 (CIFAR): 11.17 M


def test_resnet_capture_equals_site_in_eval_mode():
    model = create_model(RESNET, 5)
    x = _images()
    variables = _init(model, x)  # running statistics moved off (0, 1) too
    preacts_fn = jax.jit(rj.capture_relus(lambda v, x: model.apply(v, x)))
    out_c, captured = preacts_fn(variables, x)
    site = _site_preacts(model, variables, x)
    assert list(captured) == list(site) and len(site) == 5
    for layer, z in site.items():
        np.testing.assert_array_equal(rj.bitmask.active(captured[layer]), z > 0, err_msg=layer)
        assert 0 < float(jnp.mean(z > 0)) < 1, layer
    np.testing.assert_array_equal(out_c, jax.jit(model.apply)(variables, x))


def test_resnet_trains_on_batch_statistics_and_probes_on_running_ones():
    """The built-in step: train mode updates batch_stats; the probe reads the new running
    statistics in eval mode, so the recorded masks are z > 0 of that forward (and not of the
    train-mode forward, whose normalisation uses the probe batch's own statistics)."""
    model = create_model(RESNET, 5)
    probe_x, batch_x = _images(8, seed=4), _images(16, seed=5)
    batch = {"x": batch_x, "y": jnp.arange(16, dtype=jnp.int32) % 5}
    tx = optax.sgd(0.1)
    state = jax.jit(functools.partial(step.create_train_state, model, tx))(KEY, probe_x)
    assert isinstance(state, step.StatefulTrainState)
    before = {"params": state.params, **state.model_state.variables}
    assert float(jnp.abs(before["batch_stats"]["stem_bn"]["mean"]).sum()) == 0.0  # init
    # what one train-mode forward on the batch (pre-update params) makes of the statistics
    expected = model.apply(before, batch_x, train=True, mutable=["batch_stats"])[1]
    state, metrics, masks = step.make_step_fns(model, tx)[True](state, batch, {"x": probe_x})
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
        state.model_state.variables["batch_stats"],
        expected["batch_stats"],
    )
    variables = {"params": state.params, **state.model_state.variables}
    eval_z = _site_preacts(model, variables, probe_x)
    for layer, packed in masks.items():
        np.testing.assert_array_equal(packed.unpack(), eval_z[layer] > 0, err_msg=layer)
    # one probe example's pattern does not depend on the others (running statistics)
    alone = _site_preacts(model, variables, probe_x[:1])
    for layer, z in alone.items():
        np.testing.assert_array_equal(z > 0, eval_z[layer][:1] > 0)
    # train mode would give other bits: the test can tell the two apart
    _, train_state = model.apply(variables, probe_x, train=True, mutable=["batch_stats", PREACTS])
    train_z = flatten_layers(train_state[PREACTS])
    assert any(not np.array_equal(train_z[k] > 0, eval_z[k] > 0) for k in eval_z), (
        "train- and eval-mode bits coincide; the check above proves nothing"
    )
    assert np.isfinite(float(metrics["train/loss"])) and "flip/all" in metrics


# ----------------------------------------------------------------------------- GPT


@pytest.mark.parametrize("tie", [True, False])
def test_gpt_records_ffn_per_position_and_ties_or_not(tie):
    model = create_model({**GPT, "tie_embeddings": tie}, VOCAB)
    x = _tokens()
    params = _init(model, x)["params"]
    assert ("head" in params) is not tie
    assert params["pos_embedding"].shape == (12, 16)
    preacts_fn = jax.jit(rj.capture_relus(lambda p, x: model.apply({"params": p}, x)))
    logits, captured = preacts_fn(params, x)
    assert logits.shape == (3, 10, VOCAB) and logits.dtype == jnp.float32
    site = _site_preacts(model, {"params": params}, x)
    assert list(captured) == list(site) == ["block0/ffn/fc1", "block1/ffn/fc1"]
    for layer, z in site.items():
        assert z.shape == (3, 10, 24)
        np.testing.assert_array_equal(rj.bitmask.active(captured[layer]), z > 0)


def test_gpt_is_causal():
    """Changing token t changes logits and patterns at positions >= t only."""
    model = create_model(GPT, VOCAB)
    x = _tokens(2, 10)
    params = _init(model, x)["params"]
    preacts_fn = jax.jit(rj.capture_relus(lambda p, x: model.apply({"params": p}, x)))
    t = 6
    y = x.at[:, t].set((x[:, t] + 1) % VOCAB)
    (la, za), (lb, zb) = preacts_fn(params, x), preacts_fn(params, y)
    np.testing.assert_array_equal(la[:, :t], lb[:, :t])
    assert not np.allclose(la[:, t:], lb[:, t:])
    for layer in za:
        np.testing.assert_array_equal(za[layer][:, :t], zb[layer][:, :t])
        assert not np.array_equal(za[layer][:, t:], zb[layer][:, t:])


def test_gpt_refuses_floats_and_sequences_beyond_its_context():
    model = create_model(GPT, VOCAB)
    with pytest.raises(ValueError, match="integer tokens"):
        jax.eval_shape(model.init, KEY, jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"longer than model.context=12"):
        jax.eval_shape(model.init, KEY, jnp.zeros((2, 13), jnp.int32))


# ----------------------------------------------------------------------------- sequence targets


def test_cross_entropy_is_per_token_for_sequences_and_unchanged_for_labels():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5, VOCAB)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (4, 5)), jnp.int32)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    np.testing.assert_allclose(step.cross_entropy(logits, y), per_token.mean(1), rtol=1e-6)
    flat, labels = logits[:, 0], y[:, 0]
    np.testing.assert_array_equal(
        step.cross_entropy(flat, labels),
        optax.softmax_cross_entropy_with_integer_labels(flat, labels),
    )


def test_eval_step_gives_token_accuracy_with_padding():
    model = create_model(GPT, VOCAB)
    x = _tokens(5, 8)
    params = _init(model, x)["params"]
    y = jnp.roll(x, -1, axis=1)
    w = jnp.array([1, 1, 1, 0, 0], jnp.float32)  # the last two rows are padding
    sums = jax.jit(functools.partial(step.eval_step, model=model))(params, {"x": x, "y": y, "w": w})
    logits = jax.jit(model.apply)({"params": params}, x)[:3]
    hits = np.asarray(jnp.argmax(logits, -1) == y[:3])
    np.testing.assert_allclose(float(sums["correct"]) / 3, hits.mean(), rtol=1e-6)
    assert 0 < hits.mean() < 1
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, y[:3])
    np.testing.assert_allclose(float(sums["loss"]) / 3, float(per_token.mean()), rtol=1e-5)


# ----------------------------------------------------------------------------- data


def test_char_sequences_are_next_character_pairs():
    ds = data.char_sequences("t", "hello world, hello!", "world hello", seq_len=4)
    assert ds.x_train.shape == (4, 4) and ds.x_val.shape == (2, 4)
    assert ds.x_train.dtype == np.int32 and ds.num_classes == len(set("hello world,!"))
    flat_x, flat_y = ds.x_train.ravel(), ds.y_train.ravel()
    np.testing.assert_array_equal(flat_x[1:], flat_y[:-1])  # y is x shifted by one
    vocab = sorted(set("hello world, hello!world hello"))
    assert "".join(vocab[i] for i in ds.x_train[0]) == "hell"
    with pytest.raises(ValueError, match="too few for one sequence"):
        data.char_sequences("t", "abc", "abcdef", seq_len=4)
    with pytest.raises(ValueError, match=r"dataset.seq_len=0; allowed values"):
        data.char_sequences("t", "abc", "abc", seq_len=0)


def test_synthetic_text_is_deterministic_and_split_by_position():
    cfg = {"name": "synthetic_text", "num_samples": 50, "seq_len": 16, "seed": 3}
    a, b = data.load_dataset(cfg), data.load_dataset(cfg)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.shape == (40, 16) and a.x_val.shape == (10, 16)
    other = data.load_dataset({**cfg, "seed": 4})
    assert not np.array_equal(a.x_train, other.x_train)
    # the validation text continues the training text: its first input is the last target
    assert a.x_val[0, 0] == a.y_train[-1, -1]


def test_tiny_shakespeare_through_tfds_data_source():
    with tfds.testing.mock_data(num_examples=8):
        ds = data.load_dataset({"name": "tiny_shakespeare", "seq_len": 8})
    assert ds.name == "tiny_shakespeare" and ds.x_train.shape[1:] == ds.y_train.shape[1:] == (8,)
    assert ds.num_classes > int(max(ds.x_train.max(), ds.x_val.max()))
    np.testing.assert_array_equal(ds.x_train.ravel()[1:], ds.y_train.ravel()[:-1])


def test_tiny_shakespeare_missing_is_an_error_never_other_data(tmp_path):
    cfg = {"name": "tiny_shakespeare", "data_dir": str(tmp_path), "download": False}
    with pytest.raises(data.DatasetUnavailableError, match=r"tfds build tiny_shakespeare"):
        data.load_dataset(cfg)


# ----------------------------------------------------------------------------- bfloat16

BF16_CASES = {
    "mlp": ({"name": "mlp", "hidden": (16, 12)}, _images),
    "cnn": ({"name": "cnn", "dims": 2, "channels": (4, 6), "dense": (8,), "norm": "layer"},
            _images),
    "transformer": (
        {"name": "transformer", "num_layers": 1, "num_heads": 2, "dim": 8, "mlp_dim": 16,
         "embed": "patch", "patch_size": 2},
        _images,
    ),
    "resnet": (RESNET, _images),
    "gpt": (GPT, _tokens),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(BF16_CASES))
def test_bf16_masks_are_z_positive_of_the_bf16_preactivations(family):
    """The monitor's packed masks are ``z > 0`` of the bfloat16 ``z`` the forward computes
    (capture's, the same values the recording sites sow), in one program."""
    cfg, inputs = BF16_CASES[family]
    model = create_model({**cfg, "compute_dtype": "bfloat16"}, VOCAB)
    x = inputs()
    variables = _init(model, x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))  # f32 params
    preacts_fn = rj.capture_relus(lambda v, x: model.apply(v, x))

    def measure(v, x):
        logits, captured = preacts_fn(v, x)
        _, state = model.apply(v, x, mutable=[PREACTS])
        masks = analyzer.pattern_monitor(preacts_fn, x).init(v).masks
        return logits, captured, flatten_layers(state[PREACTS]), masks

    logits, captured, site, masks = jax.jit(measure)(variables, x)
    assert logits.dtype == jnp.float32  # for the loss
    assert site and list(captured) == list(site) == list(masks)
    for layer, z in captured.items():
        assert z.dtype == site[layer].dtype == jnp.bfloat16, layer
        np.testing.assert_array_equal(z, site[layer], err_msg=layer)
        np.testing.assert_array_equal(masks[layer].unpack(), z > 0, err_msg=layer)
        assert 0 < float(jnp.mean(z > 0)) < 1, layer


def test_bf16_differs_from_float32_and_float32_is_the_module_it_was():
    cfg = BF16_CASES["gpt"][0]
    f32, default = create_model({**cfg, "compute_dtype": "float32"}, VOCAB), create_model(cfg, 7)
    assert f32 == default and f32.dtype is None
    bf16 = create_model({**cfg, "compute_dtype": "bfloat16"}, VOCAB)
    x = _tokens()
    variables = _init(f32, x)
    z32, z16 = (_site_preacts(m, variables, x)["block0/ffn/fc1"] for m in (f32, bf16))
    assert z32.dtype == jnp.float32 and z16.dtype == jnp.bfloat16
    assert not np.array_equal(np.asarray(z16, np.float32), np.asarray(z32))


@pytest.mark.heavy  # a train-step compile; the exact-bits check above is in the fast suite
def test_bf16_train_step_records_its_own_bits():
    """The built-in step on a bfloat16 model: the state's masks are z > 0 of the bf16
    pre-activations at the post-update params."""
    model = create_model({**GPT, "num_layers": 1, "compute_dtype": "bfloat16"}, VOCAB)
    probe_x, x = _tokens(4, 10, seed=7), _tokens(8, 10, seed=8)
    tx = optax.adam(1e-2)
    state = jax.jit(functools.partial(step.create_train_state, model, tx))(KEY, probe_x)
    batch = {"x": x, "y": jnp.roll(x, -1, axis=1)}
    state, metrics, masks = step.make_step_fns(model, tx)[True](state, batch, {"x": probe_x})
    assert jax.tree.leaves(state.params)[0].dtype == jnp.float32
    z = _site_preacts(model, {"params": state.params}, probe_x)  # another program: roundings
    for layer, packed in masks.items():  # may differ; the bits agree off a bf16 ulp of zero
        assert z[layer].dtype == jnp.bfloat16
        far = np.abs(np.asarray(z[layer], np.float32)) > 2**-8 * float(jnp.abs(z[layer]).max())
        np.testing.assert_array_equal(packed.unpack()[far], (z[layer] > 0)[far], err_msg=layer)
        assert far.mean() > 0.9
    assert np.isfinite(float(metrics["train/loss"])) and 0 <= float(metrics["train/acc"]) <= 1


def test_compute_dtype_is_validated_before_anything_runs():
    config = configs.load("gpt_shakespeare:quick")
    config.model.compute_dtype = "float16"
    with pytest.raises(ConfigError) as err:
        loop.check_config(config)
    line = str(err.value)
    assert "\n" not in line
    assert "model.compute_dtype='float16'" in line and "['bfloat16', 'float32']" in line


# ----------------------------------------------------------------------------- full configs

FULL = {  # name: (x per example, dtype, y per example, num_classes)
    "resnet18_cifar10": ((32, 32, 3), np.float32, (), 10),
    "vit_s16_cifar10": ((32, 32, 3), np.float32, (), 10),
    "gpt_shakespeare": ((256,), np.int32, (256,), 65),
}


def _full_step(name):
    """The full config, checked, and its abstract record step (state, batch, probe)."""
    config = configs.load(name)
    assert config.dataset.name in data.TFDS  # the full variant reads tfds
    loop.check_config(config)  # the schema and the model's fields
    shape, dtype, y_shape, num_classes = FULL[name]
    net = as_net(create_model(config.model, num_classes))
    tx = step.make_optimizer(config.optimizer, config.num_steps)
    sds = jax.ShapeDtypeStruct
    probe = {"x": sds((config.probe.size, *shape), dtype)}
    batch = {
        "x": sds((config.batch_size, *shape), dtype),
        "y": sds((config.batch_size, *y_shape), np.int32),
    }
    state = jax.eval_shape(functools.partial(step.create_train_state, net, tx), KEY, probe["x"])
    train = functools.partial(step.train_step, model=net, tx=tx, record=True)
    return config, train, state, batch, probe


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_config_builds_and_its_step_traces_at_real_shapes(name):
    config, train, state, batch, probe = _full_step(name)
    _, metrics, masks = jax.eval_shape(train, state, batch, probe)
    assert {"train/loss", "train/acc", "flip/all"} <= set(metrics)
    positions = {"resnet18_cifar10": None, "vit_s16_cifar10": 65, "gpt_shakespeare": 256}[name]
    for packed in masks.values():
        assert packed.bits.shape[0] == config.probe.size
        if positions:
            assert packed.bits.shape[1] == positions
    n_layers = {"resnet18_cifar10": 17, "vit_s16_cifar10": 12, "gpt_shakespeare": 6}[name]
    assert len(masks) == n_layers


@pytest.mark.heavy
@pytest.mark.parametrize("name", sorted(FULL))
def test_full_config_step_compiles(name):
    _, train, state, batch, probe = _full_step(name)
    compiled = jax.jit(train).lower(state, batch, probe).compile()
    assert compiled is not None
