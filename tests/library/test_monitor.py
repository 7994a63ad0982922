"""pattern_monitor inside a user's own optax loop; the built-in step is the same monitor."""

from __future__ import annotations

import itertools
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from flax import nnx

import regime_jax as rj
from regime_jax import analyzer, data, models, records
from regime_jax.run import loop


class UserMLP(nn.Module):
    """Written as a user would: nn.relu, no regime_jax import."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16, name="fc1")(x))
        x = nn.relu(nn.Dense(12, name="fc2")(x))
        return nn.Dense(10, name="head")(x)


class UserNNX(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(40, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


def _mnist1d():
    ds = data.load_dataset({"name": "mnist1d", "num_samples": 5000, "seed": 42})
    return ds, jnp.asarray(ds.x_val[:64])


def _user_loop(apply_fn, params, probe_x, ds, steps, traces=None):
    """A plain optax loop of the user's own, plus the two monitor lines."""
    tx = optax.adam(1e-2)
    monitor = rj.pattern_monitor(rj.capture_relus(apply_fn), probe_x)

    @jax.jit
    def step(params, opt_state, mstate, x, y):
        if traces is not None:
            traces.append(1)
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            apply_fn(p, x), y
        ).mean()
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics, mstate = monitor.update(mstate, params, updates)
        return params, opt_state, mstate, metrics

    opt_state, mstate = tx.init(params), monitor.init(params)
    history = [(params, mstate)]
    for i in range(steps):
        x, y = ds.x_train[i * 32 : (i + 1) * 32], ds.y_train[i * 32 : (i + 1) * 32]
        params, opt_state, mstate, metrics = step(params, opt_state, mstate, x, y)
        history.append((params, mstate, metrics))
    return history


def test_user_step_traces_once_and_flips_equal_hand_count():
    ds, probe_x = _mnist1d()
    model = UserMLP()
    variables = model.init(jax.random.key(0), probe_x[:1])
    traces = []
    history = _user_loop(model.apply, variables, probe_x, ds, 12, traces)
    assert len(traces) == 1  # twelve steps, one trace
    z_of = lambda v: model.apply(v, probe_x, capture_intermediates=True)[1]["intermediates"]
    flips_seen = 0.0
    for (p_prev, _, *_), (p_cur, mstate, metrics) in itertools.pairwise(history):
        z_prev, z_cur = z_of(p_prev), z_of(p_cur)
        bits = {k: (np.asarray(z_cur[k]["__call__"][0]) > 0) for k in ("fc1", "fc2")}
        prev = {k: (np.asarray(z_prev[k]["__call__"][0]) > 0) for k in ("fc1", "fc2")}
        for k in bits:
            np.testing.assert_array_equal(mstate.masks[k].unpack(), bits[k])
            np.testing.assert_allclose(metrics[f"flip/{k}"], np.mean(bits[k] != prev[k]))
        pooled = sum(np.sum(bits[k] != prev[k]) for k in bits) / sum(b.size for b in bits.values())
        np.testing.assert_allclose(metrics["flip/all"], pooled, rtol=1e-6)
        flips_seen += float(metrics["flip/all"])
        diff = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b), p_cur, p_prev)
        norm = lambda t: np.sqrt(sum(np.sum(np.square(v)) for v in jax.tree.leaves(t)))
        np.testing.assert_allclose(metrics["step/abs/fc1"], norm(diff["params"]["fc1"]), rtol=1e-3)
        np.testing.assert_allclose(
            metrics["step/rel/all"], norm(diff) / norm(p_prev["params"]), rtol=1e-3
        )
    assert flips_seen > 0  # the patterns did move: the comparisons above were not vacuous


def test_monitor_keys_are_the_metrics_jsonl_keys(tmp_path):
    config = tiny_config(num_steps=6)
    loop.train_and_evaluate(config, tmp_path)
    row = json.loads((tmp_path / records.METRICS).read_text().splitlines()[2])
    kinds = ("flip", "dead", "always_on", "step", "flip_count", "dead_count", "always_on_count")
    measured = {k for k in row if "/" in k and k.split("/")[0] in kinds}
    _, probe_x = _mnist1d()
    model = models.create_model(config.model, 10)
    params = model.init(jax.random.key(0), probe_x[:1])["params"]
    preacts_fn = rj.capture_relus(lambda p, x: model.apply({"params": p}, x))
    monitor = rj.pattern_monitor(preacts_fn, probe_x)
    updates = jax.tree.map(jnp.ones_like, params)
    metrics, _ = monitor.update(monitor.init(params), params, updates)
    assert set(metrics) == measured


def test_nnx_model_in_a_user_loop():
    ds, probe_x = _mnist1d()
    apply_fn, params = rj.nnx_apply(UserNNX(nnx.Rngs(0)))
    history = _user_loop(apply_fn, params, probe_x, ds, 5)
    metrics = history[-1][2]
    # no name stack in NNX: the site is named after its kernel's module, as its step is
    assert {"flip/fc1", "flip/all", "step/abs/fc1", "step/abs/fc2"} <= set(metrics)
    assert float(metrics["step/abs/all"]) > 0


def test_monitor_rejects_bad_probe_at_init():
    model = UserMLP()
    x = jnp.ones((4, 40))
    variables = model.init(jax.random.key(0), x)
    preacts_fn = rj.capture_relus(model.apply)
    with pytest.raises(ValueError, match=r"probe_x with shape \(4, 41\) cannot be passed"):
        rj.pattern_monitor(preacts_fn, jnp.ones((4, 41))).init(variables)
    with pytest.raises(ValueError, match=r"probe_x has shape \(0, 40\).*non-empty"):
        rj.pattern_monitor(preacts_fn, jnp.ones((0, 40))).init(variables)
    with pytest.raises(ValueError, match="probe_x has shape None"):
        rj.pattern_monitor(preacts_fn, [[1.0] * 40]).init(variables)


def test_monitor_refuses_preacts_without_the_probe_axis():
    per_example = rj.capture_relus(lambda p, x: jax.nn.relu(x.sum(0) @ p))
    with pytest.raises(rj.CaptureError, match=r"does not depend on the example"):
        rj.pattern_monitor(per_example, jnp.ones((5, 3))).init(jnp.ones((3, 4)))


def test_analyzer_refuses_to_measure_nothing():
    with pytest.raises(ValueError, match="no ReLU layer"):
        analyzer.flip_rates({}, {})
    with pytest.raises(ValueError, match="no bits"):
        analyzer.dead_fractions({"fc1": rj.bitmask.Packed(jnp.zeros((0, 1), jnp.uint8), 4)})


@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_perturb_captured_equals_site(family):
    cfg = {
        "mlp": {"name": "mlp", "hidden": (12, 8)},
        "cnn": {"name": "cnn", "dims": 1, "channels": (4,), "dense": (8,)},
    }[family]
    model = models.create_model(cfg, 3)
    x = jax.random.normal(jax.random.key(1), (6, 10))
    params = model.init(jax.random.key(0), x)["params"]
    params = jax.tree.map(
        lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params
    )
    config = rj.stability.StabilityConfig(num_directions=4, num_radii=6)
    probe = jax.jit(rj.stability.perturb, static_argnames=("preacts_fn", "config"))
    captured = probe(
        rj.capture_relus(lambda p, x: model.apply({"params": p}, x)),
        params,
        x,
        jax.random.key(3),
        config,
    )
    site = probe(models.site_preacts_fn(model), params, x, jax.random.key(3), config)
    chex.assert_trees_all_equal(captured, site)
    assert float(site["kept/all"][-1]) < 1  # the largest radius does break patterns


def test_train_and_evaluate_takes_user_models(tmp_path):
    """A linen model with nn.relu and an NNX model, trained by the built-in loop unmodified."""
    for name, model in (("linen", UserMLP()), ("nnx", UserNNX(nnx.Rngs(0)))):
        workdir = tmp_path / name
        last = loop.train_and_evaluate(tiny_config(num_steps=6), workdir, model=model)
        run = records.load_run(workdir)
        assert run.config["model"]["name"] == "custom"
        assert run.config["model"]["class"].endswith(type(model).__qualname__)
        steps, flips = run.series("flip/all")
        assert list(steps) == list(range(1, 7)) and np.all(np.isfinite(flips))
        assert set(run.masks(6)) == ({"fc1", "fc2"} if name == "linen" else {"fc1"})
        assert np.isfinite(last["eval/acc"])


def test_a_model_without_relu_stops_before_any_file_is_written(tmp_path):
    class TanhMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.tanh(nn.Dense(8)(x)))

    workdir = tmp_path / "run"
    with pytest.raises(loop.ConfigError, match=r"model: no ReLU found"):
        loop.train_and_evaluate(tiny_config(), workdir, model=TanhMLP())
    assert not workdir.exists()


def test_monitor_metrics_carry_exact_counts_beside_the_rates():
    """``flip_count/..``, ``dead_count/..``, ``always_on_count/..`` beside every rate, in a
    user's jitted loop; every rate is ``np.float32(count / denominator)`` bit for bit."""
    ds, probe_x = _mnist1d()
    model = UserMLP()
    variables = model.init(jax.random.key(0), probe_x[:1])
    history = _user_loop(model.apply, variables, probe_x, ds, 4)
    _, mstate, metrics = history[-1]
    metrics = analyzer.counts_to_int(jax.device_get(metrics))
    den = analyzer.denominators(mstate.masks)
    layers = sorted(mstate.masks)
    want = {f"{kind}/{k}" for kind in ("flip", "dead", "always_on") for k in layers}
    assert set(den) == want | {"flip/all"}
    moved = 0
    for key, bits in den.items():
        count = metrics[analyzer.count_key(key)]
        assert type(count) is int and 0 <= count <= bits
        got, exact = np.float32(metrics[key]), np.float32(count / bits)
        assert got.view(np.uint32) == exact.view(np.uint32), (key, count, bits)
        moved += key.startswith("flip/") and count
    assert moved  # the flips were not all zero
    assert metrics["flip_count/all"] == sum(metrics[f"flip_count/{k}"] for k in layers)
    assert den["flip/all"] == 64 * (16 + 12) and den["dead/fc1"] == 16


def test_monitor_refuses_a_probe_that_is_not_finite():
    """NaN / inf probe inputs would count as "off" bits: refused at init, naming the example."""
    preacts_fn = rj.capture_relus(lambda p, x: jax.nn.relu(x @ p))
    w = jnp.ones((3, 4))
    for bad, kind in ((jnp.nan, "nan"), (jnp.inf, "inf"), (-jnp.inf, "inf")):
        x = jnp.ones((5, 3)).at[2, 1].set(bad)
        with pytest.raises(ValueError, match=rf"probe_x holds {kind} in probe example 2 \(1 of 5"):
            rj.pattern_monitor(preacts_fn, x).init(w)
    pair = {"a": jnp.ones((5, 3)), "b": jnp.ones((5, 3)).at[4].set(jnp.nan)}
    fn = rj.capture_relus(lambda p, x: jax.nn.relu((x["a"] + x["b"]) @ p))
    with pytest.raises(ValueError, match=r"probe_x\['b'\] holds nan in probe example 4"):
        rj.pattern_monitor(fn, pair).init(w)
    rj.pattern_monitor(preacts_fn, jnp.ones((5, 3))).init(w)  # finite: accepted
