"""Analyzer: jit and no-jit agree; values match plain numpy; step sizes match saved params."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

from regime_jax import analyzer
from regime_jax.bitmask import Packed
from regime_jax.models import create_model


def _random_patterns(seed, shapes):
    rng = np.random.default_rng(seed)
    return {k: rng.random(s) > 0.5 for k, s in shapes.items()}


SHAPES = {"fc1": (16, 13), "conv1": (16, 5, 4, 7), "block0/ffn/fc1": (16, 9, 20)}


class AnalyzerTest(chex.TestCase, parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_flip_rates_match_numpy(self):
        a, b = _random_patterns(0, SHAPES), _random_patterns(1, SHAPES)
        pa = {k: Packed.from_bool(v) for k, v in a.items()}
        pb = {k: Packed.from_bool(v) for k, v in b.items()}
        got = self.variant(analyzer.flip_rates)(pa, pb)
        for k in SHAPES:
            np.testing.assert_allclose(got[k], np.mean(a[k] != b[k]), rtol=1e-6)
        pooled = sum(np.sum(a[k] != b[k]) for k in SHAPES) / sum(a[k].size for k in SHAPES)
        np.testing.assert_allclose(got["all"], pooled, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_dead_and_always_on_over_positions_and_units(self):
        bits = _random_patterns(2, SHAPES)
        bits["fc1"][:, 3] = False  # a dead unit
        bits["conv1"][:, 1, 2, 5] = True  # an always-on (position, channel) site
        packed = {k: Packed.from_bool(v) for k, v in bits.items()}
        metrics = self.variant(analyzer.pattern_metrics)(None, packed)
        assert not any(k.startswith("flip/") for k in metrics)
        for k, v in bits.items():
            np.testing.assert_allclose(metrics[f"dead/{k}"], np.mean(~v.any(0)), rtol=1e-6)
            np.testing.assert_allclose(metrics[f"always_on/{k}"], np.mean(v.all(0)), rtol=1e-6)
        assert metrics["dead/fc1"] >= 1 / 13 and metrics["always_on/conv1"] >= 1 / (5 * 4 * 7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_step_sizes_equal_parameter_differences(self):
        model = create_model({"name": "mlp", "hidden": (8, 6)}, 3)
        x = jax.random.normal(jax.random.key(0), (5, 4))
        params0 = model.init(jax.random.key(1), x)["params"]
        tx = optax.sgd(0.3, momentum=0.9)
        grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(params0)
        updates, _ = tx.update(grads, tx.init(params0), params0)
        params1 = optax.apply_updates(params0, updates)
        got = self.variant(analyzer.step_sizes)(updates, params0)
        diff = jax.tree.map(
            lambda a, b: np.asarray(a, np.float64) - np.asarray(b), params1, params0
        )
        norm = lambda t: np.sqrt(sum(np.sum(np.square(v)) for v in jax.tree.leaves(t)))
        for part in ("fc1", "fc2", "head"):
            np.testing.assert_allclose(got[f"step/abs/{part}"], norm(diff[part]), rtol=1e-4)
            np.testing.assert_allclose(
                got[f"step/rel/{part}"], norm(diff[part]) / norm(params0[part]), rtol=1e-4
            )
        np.testing.assert_allclose(got["step/abs/all"], norm(diff), rtol=1e-4)
        assert float(got["step/abs/all"]) > 0
