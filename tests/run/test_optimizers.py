"""The optimizers and schedules of ``optimizer.*``: step decay's boundaries, AdamW against
Adam, and their fields' one-line errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

from regime_jax.configs.base import ConfigError, validate_config
from regime_jax.run import step


def _rates(cfg: dict, num_steps: int, steps) -> list[float]:
    """The learning rate at each of ``steps``: the update of plain SGD on a unit gradient."""
    tx = step.make_optimizer(cfg | {"name": "sgd", "momentum": 0.0}, num_steps)
    params, out = {"w": jnp.zeros(())}, {}
    state = tx.init(params)
    for t in range(max(steps) + 1):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        out[t] = -float(updates["w"])
    return [out[t] for t in steps]


def test_step_schedule_drops_tenfold_at_half_and_three_quarters():
    cfg = {"learning_rate": 0.5, "schedule": "step", "warmup_steps": 0}
    got = _rates(cfg, 100, [0, 49, 50, 74, 75, 99])
    np.testing.assert_allclose(got, [0.5, 0.5, 0.05, 0.05, 0.005, 0.005], rtol=1e-6)


def test_step_schedule_with_warmup_keeps_its_boundaries_absolute():
    cfg = {"learning_rate": 1.0, "schedule": "step", "warmup_steps": 10}
    got = _rates(cfg, 40, [0, 5, 10, 19, 20, 29, 30])
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 1.0, 0.1, 0.1, 0.01], rtol=1e-6, atol=1e-7)
    constant = _rates(cfg | {"schedule": "constant"}, 40, [0, 5, 10])
    np.testing.assert_allclose(got[:3], constant, rtol=1e-6)  # the same warmup


def test_step_schedule_of_a_very_short_run_applies_both_drops():
    s = step.step_decay_schedule(1.0, 0, 2)  # both boundaries at step 1
    np.testing.assert_allclose([float(s(0)), float(s(1))], [1.0, 0.01], rtol=1e-6)


def _updates(name: str, weight_decay: float):
    cfg = {"name": name, "learning_rate": 1e-2, "schedule": "constant"}
    tx = step.make_optimizer(cfg | {"weight_decay": weight_decay}, 10)
    keys = jax.random.split(jax.random.key(0), 2)
    params = {"w": jax.random.normal(keys[0], (5, 3))}
    grads = {"w": jax.random.normal(keys[1], (5, 3))}
    state, out = tx.init(params), []
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        out.append(updates["w"])
    return params["w"], out


def test_adamw_is_adam_plus_decoupled_weight_decay():
    params, adam = _updates("adam", 0.5)  # adam ignores weight_decay
    _, adam_other = _updates("adam", 0.0)
    _, no_decay = _updates("adamw", 0.0)
    _, adamw = _updates("adamw", 0.5)
    for a, b, c, w in zip(adam, adam_other, no_decay, adamw, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(c, a, rtol=1e-6, atol=1e-9)  # no decay: adam exactly
        # the only difference: -lr x weight_decay x params (params fixed here)
        np.testing.assert_allclose(w - a, -1e-2 * 0.5 * params, rtol=1e-5, atol=1e-8)
        assert float(jnp.abs(w - a).max()) > 1e-4


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"optimizer.weight_decay": -1e-4}, "optimizer.weight_decay=-0.0001 must be a finite"),
        ({"optimizer.weight_decay": float("inf")}, "optimizer.weight_decay=inf must be a finite"),
        ({"optimizer.weight_decay": float("nan")}, "optimizer.weight_decay=nan must be a finite"),
        ({"optimizer.weight_decay": 0.1}, "weight_decay=0.1 is read by optimizer.name='adamw'"),
        (
            {"optimizer.name": "adam", "optimizer.weight_decay": 0.0},
            "allowed: optimizer.name=adamw, or weight_decay left at 0.0001",
        ),
        ({"dataset.label_noise": 1.0}, "dataset.label_noise=1.0 must be a number in [0, 1)"),
        ({"dataset.label_noise": -0.1}, "dataset.label_noise=-0.1 must be a number in [0, 1)"),
        ({"optimizer.schedule": "linear"}, "allowed values: ['constant', 'cosine', 'step']"),
        ({"optimizer.name": "rmsprop"}, "allowed values: ['adam', 'adamw', 'sgd']"),
    ],
)
def test_new_fields_are_refused_in_one_line(override, expected):
    with pytest.raises(ConfigError) as err:
        validate_config(tiny_config(**override))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_new_fields_defaults_validate():
    config = tiny_config(**{"optimizer.name": "adamw", "optimizer.schedule": "step"})
    validate_config(config)
    assert config.optimizer.weight_decay == 1e-4 and config.dataset.label_noise == 0.0
    validate_config(tiny_config(**{"optimizer.name": "adamw", "optimizer.weight_decay": 0.1}))
    assert isinstance(step.make_optimizer(config.optimizer, 10), optax.GradientTransformation)
