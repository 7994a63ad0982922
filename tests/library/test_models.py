"""The MLP records every hidden layer through the one recording site."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from regime_jax.models import PREACTS, create_model, patterns_of, preacts_of


@pytest.mark.parametrize("hidden", [(7,), (16, 9), (5, 6, 11)])
def test_mlp_records_every_hidden_layer(hidden):
    model = create_model({"name": "mlp", "hidden": hidden}, 10)
    x = jax.random.normal(jax.random.key(0), (6, 8, 8, 1))
    params = model.init(jax.random.key(1), x)["params"]
    pre = preacts_of(model, params, x)
    assert list(pre) == [f"fc{i}" for i in range(1, len(hidden) + 1)]
    for i, width in enumerate(hidden, start=1):
        assert pre[f"fc{i}"].shape == (6, width)
    np.testing.assert_allclose(
        pre["fc1"],
        x.reshape(6, -1) @ params["fc1"]["kernel"] + params["fc1"]["bias"],
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_array_equal(patterns_of(pre)["fc1"], pre["fc1"] > 0)


def test_outputs_identical_with_and_without_recording():
    model = create_model({"name": "mlp", "hidden": (32, 32)}, 10)
    x = jax.random.normal(jax.random.key(0), (9, 40))
    params = model.init(jax.random.key(1), x)["params"]
    plain = model.apply({"params": params}, x)
    recorded, state = model.apply({"params": params}, x, mutable=[PREACTS])
    np.testing.assert_array_equal(plain, recorded)
    assert set(state[PREACTS]) == {"fc1", "fc2"}


def test_exact_zero_is_off():
    assert not bool(patterns_of({"fc1": jnp.zeros((1, 1))})["fc1"][0, 0])


def test_unknown_model_and_bad_widths_are_refused():
    with pytest.raises(ValueError, match=r"model.name='vgg' is unknown; allowed values"):
        create_model({"name": "vgg"}, 10)
    with pytest.raises(ValueError, match=r"model\.hidden"):
        create_model({"name": "mlp", "hidden": (8, 0)}, 10)
