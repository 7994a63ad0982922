"""Finite-difference stability test: local stability, the measure-zero exception, agreement of
the first-order radius with the empirical one, jit/no-jit, directions, summaries.

float64 cases run inside ``jax.enable_x64(True)`` (a context manager: nothing leaks into other
test modules). Params are drawn with numpy from a continuous distribution (biases included: the
zero-bias linen init sits on the measure-zero set where patterns break at every radius), and
architectures come from a small set so the jit cache is reused across hypothesis examples.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regime_jax import stability as S
from regime_jax.models import MODELS, create_model, preacts_of, relu, site_preacts_fn

probe = jax.jit(S.perturb, static_argnames=("preacts_fn", "config"))
metrics_jit = jax.jit(S.perturbation_metrics, static_argnames=("preacts_fn", "config"))
first_order_jit = jax.jit(S.first_order_radius, static_argnames=("preacts_fn", "two_sided"))
breaking_jit = jax.jit(S.empirical_breaking_radius, static_argnames=("preacts_fn", "radius_batch"))
directions_jit = jax.jit(S.random_directions, static_argnums=2)
layer_directions_jit = jax.jit(S.random_layer_directions, static_argnums=2)
quantiles_jit = jax.jit(S.radius_quantiles, static_argnames="qs")
preacts_jit = jax.jit(preacts_of, static_argnums=0)
# Shared by the property test and the measure-zero test (one compile per architecture).
SMALL_RADII = S.StabilityConfig(num_directions=4, min_radius=1e-9, max_radius=1.0, num_radii=10)


def random_params(model, x, seed, scale=1.0):
    """Continuous random params (numpy, no per-shape RNG compiles): kernels ~ N(0, 1/fan_in)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32  # linen params: float32

    def draw(s):
        std = 1 / np.sqrt(s.shape[0]) if len(s.shape) >= 2 else 0.5
        return jnp.asarray(scale * std * rng.normal(size=s.shape), dtype)

    return jax.tree.map(draw, shapes)


def mlp_case(hidden, seed=0, num=8, dim=6, param_scale=1.0, input_scale=1.0):
    model = create_model({"name": "mlp", "hidden": list(hidden)}, 3)
    x = jnp.asarray(input_scale * np.random.default_rng(seed + 1).normal(size=(num, dim)))
    return model, random_params(model, x, seed, param_scale), x


def one(dirs, d):
    return jax.tree.map(lambda a: a[d], dirs)


def global_norms(dirs):
    return np.sqrt(
        sum(np.sum(np.square(a).reshape(a.shape[0], -1), 1) for a in jax.tree.leaves(dirs))
    )


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_directions", 0),
        ("num_directions", 2.0),
        ("min_radius", 0.0),
        ("min_radius", float("inf")),
        ("max_radius", 1e-9),
        ("num_radii", 0),
        ("refine", -1),
        ("per_layer", 1),
        ("radius_batch", 0),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field}=.*allowed values"):
        S.StabilityConfig(**{field: value})


def test_config_grids():
    cfg = S.StabilityConfig()
    np.testing.assert_allclose(cfg.radii, np.logspace(-6, 0, 12))
    fine = S.StabilityConfig(refine=3).fine_radii
    assert fine.shape == (45,) and np.all(np.diff(fine) > 0)
    np.testing.assert_array_equal(fine[::4], cfg.radii)  # coarse radii kept exactly
    assert hash(cfg) == hash(S.StabilityConfig())  # static jit argument


# ----------------------------------------------------------------------------- directions


def test_random_directions_unit_norm_and_keyed():
    _, params, _ = mlp_case([5, 4])
    dirs = directions_jit(jax.random.key(0), params, 7)
    chex.assert_trees_all_equal_shapes(
        dirs, jax.tree.map(lambda a: jnp.zeros((7, *a.shape)), params)
    )
    np.testing.assert_allclose(global_norms(dirs), 1, rtol=1e-5)
    again = directions_jit(jax.random.key(0), params, 7)
    chex.assert_trees_all_equal(dirs, again)
    other = directions_jit(jax.random.key(1), params, 7)
    assert not np.allclose(dirs["fc1"]["kernel"], other["fc1"]["kernel"])
    # Every leaf gets its own noise (not one slice repeated) and all directions differ.
    assert not np.allclose(dirs["fc1"]["bias"][0, :4], dirs["fc2"]["bias"][0, :4])
    assert np.linalg.matrix_rank(np.asarray(dirs["fc1"]["kernel"]).reshape(7, -1)) == 7


def test_layer_directions_touch_only_their_layer():
    _, params, _ = mlp_case([5, 4])
    layers = S.param_layers(params)
    assert layers == ("fc1", "fc2", "head")
    dirs = layer_directions_jit(jax.random.key(3), params, 4)
    np.testing.assert_allclose(global_norms(dirs), 1, rtol=1e-5)
    for li, name in enumerate(layers):
        rows = slice(4 * li, 4 * li + 4)
        for other in layers:
            mass = sum(float(jnp.abs(a[rows]).sum()) for a in jax.tree.leaves(dirs[other]))
            assert (mass > 0) == (other == name), (name, other, mass)


def test_per_layer_probe_head_directions_never_change_patterns():
    with jax.enable_x64(True):
        model, params, x = mlp_case([8, 8], num=16)
        cfg = S.StabilityConfig(
            num_directions=4, min_radius=1e-6, max_radius=10.0, num_radii=5, per_layer=True
        )
        out = probe(model, params, x, jax.random.key(0), cfg)
        assert out["first_order_radius"].shape == (12, 16)
        np.testing.assert_array_equal(out["by_param/head/kept/all"], 1)  # after the last ReLU
        np.testing.assert_array_equal(out["by_param/head/flip/all"], 0)
        assert out["by_param/head/output_change"][-1] > 0
        assert out["by_param/fc1/kept/all"][-1] < 1  # radius 10 breaks patterns
        assert np.isinf(out["first_order_radius"][8:]).all()  # no recorded unit sees the head
        assert np.isfinite(out["first_order_radius"][:8]).any()


# ----------------------------------------------------------------------------- stability


# Widths 2..32, depths 1..3 from a few architectures: each new one costs an XLA compile.
ARCHS = [(2,), (32,), (5, 13), (13, 32, 5)]


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    hidden=st.sampled_from(ARCHS),
    seed=st.integers(0, 2**31 - 1),
    log_param_scale=st.floats(-1, 1),
    log_input_scale=st.floats(-1, 1),
)
def test_small_perturbations_keep_every_pattern(hidden, seed, log_param_scale, log_input_scale):
    """Local stability: below some eps every pattern is kept; kept falls (noisily) with eps."""
    with jax.enable_x64(True):
        model, params, x = mlp_case(
            hidden, seed, param_scale=10**log_param_scale, input_scale=10**log_input_scale
        )
        out = probe(model, params, x, jax.random.key(seed % 1000), SMALL_RADII)
        kept, flip = np.asarray(out["kept/all"]), np.asarray(out["flip/all"])
        assert out["radii"].dtype == jnp.float64 and out["output_change"].dtype == jnp.float64
        assert kept[0] == 1 and flip[0] == 0, (kept, np.min(out["first_order_radius"]))
        assert np.all(np.diff(kept) <= 0.1), kept  # 3 of 32 pairs may flip back in a step
        assert np.all((0 <= flip) & (flip <= 1))
        for name in (f"fc{i + 1}" for i in range(len(hidden))):
            assert np.all(out[f"kept/{name}"] >= kept)
        np.testing.assert_array_equal(
            out["breaking_radius"], np.min(out["breaking_radius_dir"], axis=0)
        )
        assert np.all(out["breaking_radius_dir_lower"] < out["breaking_radius_dir"])
        assert np.all(out["first_order_radius"] > 1e-9)


def zero_margin_case():
    """fc1 unit 0 has bias 0 and example 0 is the zero input: z = 0 exactly (bit off)."""
    model, params, x = mlp_case((5, 13), seed=4)  # an ARCHS entry: SMALL_RADII is compiled
    params["fc1"]["bias"] = params["fc1"]["bias"].at[0].set(0.0)
    x = x.at[0].set(0.0)
    up = jax.tree.map(jnp.zeros_like, params)
    up["fc1"]["bias"] = up["fc1"]["bias"].at[0].set(1.0)
    return model, params, x, up


def test_measure_zero_case_breaks_at_every_radius():
    with jax.enable_x64(True):
        model, params, x, up = zero_margin_case()
        assert preacts_jit(model, params, x)["fc1"][0, 0] == 0
        radii = np.geomspace(1e-15, 1e-1, 15)
        # +bias turns the unit on at every eps > 0, to first order and exactly.
        assert first_order_jit(model, params, x, up)[0] == 0
        brk = breaking_jit(model, params, x, up, radii)
        assert brk[0] == radii[0] and np.all(brk[1:] > radii[0])
        # -bias pushes it further off: no flip for that unit; the example stays stable.
        down = jax.tree.map(jnp.negative, up)
        assert first_order_jit(model, params, x, down)[0] > 1e-6
        assert breaking_jit(model, params, x, down, radii)[0] > 1e-6
        # two-sided |z| / |J u| sees the zero margin in both directions
        assert first_order_jit(model, params, x, down, two_sided=True)[0] == 0
        # random directions: about half push the bias up, so the probe reports the break.
        out = probe(model, params, x, jax.random.key(0), SMALL_RADII)
        assert out["kept/all"][0] < 1 and out["kept/fc1"][0] < 1
        assert out["breaking_radius"][0] == out["radii"][0]
        assert np.min(out["first_order_radius"][:, 0]) == 0
        assert np.all(out["breaking_radius"][1:] > out["radii"][0])
        # Control: move off the null set (bias != 0) and the pattern is locally stable again.
        params["fc1"]["bias"] = params["fc1"]["bias"].at[0].set(-0.3)
        out = probe(model, params, x, jax.random.key(0), SMALL_RADII)
        assert out["kept/all"][0] == 1 and np.min(out["first_order_radius"]) > 1e-9


def test_first_order_radius_matches_empirical_breaking_radius():
    with jax.enable_x64(True):
        model, params, x = mlp_case([16, 16], seed=7, num=32, dim=8)
        # fine grid: 25 steps per decade (ratio 1.096 between tested radii)
        cfg = S.StabilityConfig(
            num_directions=8,
            min_radius=1e-4,
            max_radius=1e-1,
            num_radii=4,
            refine=24,
            radius_batch=5,  # 76 fine radii: 15 batches and a remainder of 1
        )
        out = probe(model, params, x, jax.random.key(1), cfg)
        fo, upper, lower = (
            np.asarray(out[k])
            for k in ("first_order_radius", "breaking_radius_dir", "breaking_radius_dir_lower")
        )
        small = np.isfinite(upper) & (fo < 0.1) & (fo > 1e-4)  # median fo is ~0.4 here
        assert small.sum() >= 20, small.sum()
        ratio = upper[small] / fo[small]
        assert np.all((ratio >= 0.8) & (ratio <= 1.25)), ratio
        # the first-order radius lies in (or next to) the grid bracket
        assert np.all(lower[small] <= 1.1 * fo[small]) and np.all(upper[small] >= fo[small] / 1.1)
        np.testing.assert_allclose(out["ratio"][small], ratio)
        # the single-direction helpers agree with the probe
        dirs = directions_jit(jax.random.key(1), params, 8)
        np.testing.assert_allclose(
            first_order_jit(model, params, x, one(dirs, 3)), fo[3], rtol=1e-9
        )
        brk = breaking_jit(model, params, x, one(dirs, 3), cfg.fine_radii)
        np.testing.assert_array_equal(brk, upper[3])
        # two-sided radius is never larger than the one-sided one
        two = first_order_jit(model, params, x, one(dirs, 3), two_sided=True)
        assert np.all(two <= fo[3] * (1 + 1e-12)) and np.any(two < fo[3] / 2)


# ----------------------------------------------------------------------------- jit, keys


class JitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree_and_keys_matter(self):
        model, params, x = mlp_case([4], num=6, dim=3)
        cfg = S.StabilityConfig(num_directions=3, num_radii=4, radius_batch=2)
        fn = self.variant(S.perturb, static_argnames=("preacts_fn", "config"))
        out = fn(model, params, x, jax.random.key(5), cfg)
        ref = probe(model, params, x, jax.random.key(5), cfg)
        self.assertEqual(set(out), set(ref))
        chex.assert_trees_all_close(out, ref, rtol=1e-5)
        again = fn(model, params, x, jax.random.key(5), cfg)
        chex.assert_trees_all_equal(out, again)  # deterministic for a key
        other = fn(model, params, x, jax.random.key(6), cfg)
        self.assertFalse(np.allclose(out["first_order_radius"], other["first_order_radius"]))


def test_radius_batching_does_not_change_results():
    model, params, x = mlp_case([8, 8], num=12)
    # all radii in one vmap vs the default lax.map in batches of 4 (the first-order test runs
    # a lax.map with a remainder and checks it against the all-at-once helper)
    cfgs = [S.StabilityConfig(num_directions=4, radius_batch=b) for b in (None, 4)]
    full, batched = (probe(model, params, x, jax.random.key(2), c) for c in cfgs)
    chex.assert_trees_all_close(full, batched, rtol=1e-5)
    assert full["kept/all"][-1] < 1  # something to compare


# ----------------------------------------------------------------------------- other models


class TokenNet(nn.Module):
    """Hand-written: a recorded Dense site and a recorded module site, with a positions axis."""

    @nn.compact
    def __call__(self, x_PxTxF):
        proj = nn.Dense(6, name="proj")
        h = relu(proj, proj(x_PxTxF))
        h = Block(name="block0")(h)
        return nn.Dense(3, name="head")(h.mean(axis=1))


class Block(nn.Module):
    @nn.compact
    def __call__(self, h):
        return relu(self, nn.Dense(5, name="up")(h))  # recorded at the block's path


OTHER_MODELS = [
    ("tokennet", lambda: TokenNet(), (10, 4, 3), ("proj", "block0")),
    (
        "cnn",
        lambda: create_model({"name": "cnn", "dims": 1, "channels": [4, 4], "dense": [8]}, 3),
        (10, 16),
        ("conv1", "conv2", "fc1"),
    ),
    (
        "transformer",
        lambda: create_model(
            {
                "name": "transformer",
                "num_layers": 1,
                "num_heads": 2,
                "dim": 8,
                "mlp_dim": 8,
                "embed": "scalar",
            },
            3,
        ),
        (6, 8),
        ("block0/ffn/fc1",),
    ),
]


@pytest.mark.parametrize(
    "name, make, shape, layers", OTHER_MODELS, ids=[c[0] for c in OTHER_MODELS]
)
def test_probe_is_generic_over_models(name, make, shape, layers):
    if name != "tokennet" and name not in MODELS:
        pytest.fail(f"{name} expected in regime_jax.models.MODELS")
    with jax.enable_x64(True):
        model = make()
        x = jnp.asarray(np.random.default_rng(0).normal(size=shape))
        params = random_params(model, x, seed=1)
        cfg = S.StabilityConfig(num_directions=3, min_radius=1e-9, num_radii=6, per_layer=True)
        # Through the explicit sites: TokenNet names its block by the site, not the producer.
        out = probe(site_preacts_fn(model), params, x, jax.random.key(0), cfg)
        num_dirs = 3 * len(params)
        recorded = {k.removeprefix("kept/") for k in out if k.startswith("kept/")} - {"all"}
        assert recorded == set(layers)
        for layer in layers:
            assert out[f"kept/{layer}"].shape == (6,) and out[f"flip/{layer}"].shape == (6,)
        assert out["kept/all"][0] == 1 and out["flip/all"][0] == 0
        assert out["first_order_radius"].shape == (num_dirs, shape[0])
        np.testing.assert_array_equal(out["by_param/head/kept/all"], 1)
        fo = np.asarray(out["first_order_radius"])
        assert np.all(fo > 1e-9) and np.isfinite(fo).any()
        assert out["kept/all"][-1] < 1  # radius 1 does break something


# ----------------------------------------------------------------------------- summaries


def test_radius_quantiles_censors_inf():
    q = quantiles_jit(jnp.array([3.0, 1.0, jnp.inf, 2.0]), qs=(0.0, 0.5, 0.9, 1.0))
    assert float(q["q0"]) == 1 and float(q["q50"]) == 2.5
    assert np.isinf(q["q90"]) and np.isinf(q["q100"])
    assert float(q["finite_q50"]) == 2 and float(q["finite_q100"]) == 3
    assert int(q["num_inf"]) == 1 and float(q["frac_inf"]) == 0.25
    allinf = quantiles_jit(jnp.full(3, jnp.inf), qs=(0.5,))
    assert np.isinf(allinf["q50"]) and np.isnan(allinf["finite_q50"])
    sample = np.random.default_rng(0).lognormal(size=101)
    got = quantiles_jit(jnp.asarray(sample))
    for key, level in (("q10", 0.1), ("q25", 0.25), ("q50", 0.5), ("q90", 0.9)):
        np.testing.assert_allclose(got[key], np.quantile(sample, level), rtol=1e-5)
    with pytest.raises(ValueError, match="quantile level"):
        S.radius_quantiles(jnp.ones(3), qs=(1.5,))


def test_probe_metrics_keys_and_values():
    model, params, x = mlp_case([8, 8], num=12)
    cfg = S.StabilityConfig(num_directions=4)
    m = metrics_jit(model, params, x, jax.random.key(0), cfg)
    out = probe(model, params, x, jax.random.key(0), cfg)
    labels = [f"{r:.0e}" for r in cfg.radii]
    assert labels[:3] == ["1e-06", "4e-06", "1e-05"] and len(set(labels)) == 12
    for i, lab in enumerate(labels):
        assert float(m[f"stability/kept@{lab}"]) == float(out["kept/all"][i])
        assert float(m[f"stability/flip@{lab}"]) == float(out["flip/all"][i])
        assert float(m[f"stability/kept/fc2@{lab}"]) == float(out["kept/fc2"][i])
        assert f"stability/output_change@{lab}" in m
    for k in (
        "radius_q50",
        "radius_frac_inf",
        "first_order_q50",
        "ratio_q50",
        "first_order_in_bracket",
    ):
        assert f"stability/{k}" in m
    fo = np.min(out["first_order_radius"], axis=0)
    np.testing.assert_allclose(m["stability/first_order_q50"], np.quantile(fo, 0.5), rtol=1e-5)
    assert all(np.shape(v) == () for v in m.values())
    # a grid finer than one digit falls back to distinct 3-digit labels
    fine = S.StabilityConfig(min_radius=1e-3, max_radius=1e-2, num_radii=12)
    labels = S._radius_labels(fine.radii)
    assert labels[:2] == ["1.00e-03", "1.23e-03"] and len(set(labels)) == 12
