"""Sign patterns beyond ReLU (issue 24, part 4): capture's opt-in ``activations=``, its keys,
its decoupled (gated) form, and the config / model that opt in."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from regime_jax import configs, gating, models
from regime_jax.capture import ACTIVATIONS, CaptureError, capture_relus, gate_relus
from regime_jax.configs import base

GELU_EXACT = lambda z: jax.nn.gelu(z, approximate=False)
FUNCTIONS = {
    "gelu": ("gelu", nn.gelu),
    "gelu_exact": ("gelu", GELU_EXACT),
    "silu": ("silu", jax.nn.silu),
    "swish": ("swish", nn.swish),
    "leaky_relu": ("leaky_relu", jax.nn.leaky_relu),
}


class MLP(nn.Module):
    act: object
    act2: object = None

    @nn.compact
    def __call__(self, x):
        h = self.act(nn.Dense(8, name="fc1")(x))
        h = (self.act2 or self.act)(nn.Dense(6, name="fc2")(h))
        return nn.Dense(3, name="head")(h)


def _setup(act, act2=None):
    model = MLP(act, act2)
    x = jax.random.normal(jax.random.key(1), (7, 4))
    return model, model.init(jax.random.key(0), x), x


def _by_hand(variables, x):
    """fc1's and fc2's pre-activations computed from the params, for the model's own act."""
    p = variables["params"]
    return lambda act: (
        (z1 := x @ p["fc1"]["kernel"] + p["fc1"]["bias"]),
        act(z1) @ p["fc2"]["kernel"] + p["fc2"]["bias"],
    )


@pytest.mark.parametrize("case", list(FUNCTIONS))
def test_opted_in_bits_are_the_sign_of_the_hand_computed_preactivation(case):
    name, act = FUNCTIONS[case]
    model, variables, x = _setup(act)
    out, preacts = capture_relus(model.apply, activations=(name,))(variables, x)
    fn = {"swish": "silu"}.get(name, name)
    assert list(preacts) == [f"fc1:{fn}", f"fc2:{fn}"]  # keys name the function
    z1, z2 = _by_hand(variables, x)(act)
    np.testing.assert_allclose(preacts[f"fc1:{fn}"], z1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(preacts[f"fc2:{fn}"], z2, rtol=1e-5, atol=1e-5)
    # bits: z > 0, and the same as f(z) > 0 for these functions
    for key, z in ((f"fc1:{fn}", z1), (f"fc2:{fn}", z2)):
        np.testing.assert_array_equal(preacts[key] > 0, z > 0)
        np.testing.assert_array_equal(preacts[key] > 0, act(preacts[key]) > 0)
    np.testing.assert_array_equal(out, model.apply(variables, x))


@pytest.mark.parametrize("case", ["gelu", "silu"])
def test_default_refuses_a_model_without_relu_and_says_how_to_opt_in(case):
    model, variables, x = _setup(FUNCTIONS[case][1])
    with pytest.raises(CaptureError, match=r"no ReLU found.*opt in with activations="):
        capture_relus(model.apply)(variables, x)


def test_a_name_outside_the_set_is_one_line_naming_the_field_and_values():
    with pytest.raises(ValueError) as err:
        capture_relus(lambda p, x: x, activations=("tanh",))
    msg = str(err.value)
    assert "\n" not in msg and "activations" in msg and "'tanh'" in msg and "gelu" in msg
    with pytest.raises(ValueError, match="non-empty tuple"):
        gate_relus(lambda p, x: x, activations="gelu")


def test_relu_and_gelu_sites_are_told_apart_by_key():
    model, variables, x = _setup(nn.relu, nn.gelu)
    both = capture_relus(model.apply, activations=("relu", "gelu"))
    assert list(both(variables, x)[1]) == ["fc1", "fc2:gelu"]
    assert list(capture_relus(model.apply)(variables, x)[1]) == ["fc1"]  # default: ReLU only
    assert list(capture_relus(model.apply, activations=("gelu",))(variables, x)[1]) == ["fc2:gelu"]
    sites = {s.name: s for s in both.sites(variables, x)}
    assert sites["fc2:gelu"].taken and sites["fc2:gelu"].spelling == "jax.nn.gelu"
    assert sites["fc1"].spelling == "jax.nn.relu"


@pytest.mark.parametrize("case", list(FUNCTIONS))
def test_gated_with_gates_equal_to_values_is_the_model_bit_for_bit(case):
    name, act = FUNCTIONS[case]
    model, variables, x = _setup(act)
    gated = gate_relus(model.apply, activations=(name,))
    copy = jax.tree.map(jnp.array, variables)  # equal values, other buffers: not shared
    out, z_v, z_g = gated(variables, copy, x)
    np.testing.assert_array_equal(out, model.apply(variables, x))
    jit_out = jax.jit(lambda v, g: gated(v, g, x)[0])(variables, copy)
    np.testing.assert_array_equal(jit_out, jax.jit(model.apply)(variables, x))
    preacts = capture_relus(model.apply, activations=(name,))(variables, x)[1]
    for key in preacts:
        np.testing.assert_array_equal(z_v[key], preacts[key])
        np.testing.assert_array_equal(z_g[key], preacts[key])


def test_gated_gelu_is_values_times_the_gate_cdf():
    """h = z_values * Phi(z_gates) at every GELU (exact form: Phi = the normal cdf)."""
    model, values, x = _setup(GELU_EXACT)
    gates = model.init(jax.random.key(5), x)
    out, z_v, z_g = gate_relus(model.apply, activations=("gelu",))(values, gates, x)
    phi = lambda z: 0.5 * jax.scipy.special.erfc(-z / jnp.sqrt(2.0))
    pv, pg = values["params"], gates["params"]
    np.testing.assert_allclose(z_v["fc1:gelu"], x @ pv["fc1"]["kernel"] + pv["fc1"]["bias"], 1e-6)
    h1 = z_v["fc1:gelu"] * phi(z_g["fc1:gelu"])
    np.testing.assert_allclose(z_v["fc2:gelu"], h1 @ pv["fc2"]["kernel"] + pv["fc2"]["bias"], 1e-5)
    h2 = z_v["fc2:gelu"] * phi(z_g["fc2:gelu"])
    np.testing.assert_allclose(out, h2 @ pv["head"]["kernel"] + pv["head"]["bias"], 1e-5, 1e-6)
    assert not np.allclose(out, model.apply(values, x))  # the gates do switch something
    assert pg is not pv
    grads = jax.grad(lambda g: gating.gated_net(model.apply, ("gelu",)).apply(values, g, x).sum())
    assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(grads(gates)))


def test_elu_is_recorded_but_its_gating_refused():
    model, variables, x = _setup(jax.nn.elu)
    assert list(capture_relus(model.apply, activations=("elu",))(variables, x)[1]) == [
        "fc1:elu",
        "fc2:elu",
    ]
    with pytest.raises(CaptureError, match=r"jax\.nn\.elu cannot be gated"):
        gate_relus(model.apply, activations=("elu",))(
            variables, jax.tree.map(jnp.array, variables), x
        )


def test_config_field_is_validated_and_matches_capture():
    assert base.ACTIVATIONS == ACTIVATIONS
    assert base.ADDED_FIELDS["record.activations"] == ("relu",)
    assert tuple(base.base_config().record.activations) == ("relu",)
    c = configs.load("mlp_mnist1d:quick")
    c.record.activations = ("tanh",)
    with pytest.raises(base.ConfigError, match=r"record.activations=\('tanh',\); allowed"):
        base.validate_config(c)
    c = configs.load("transformer_mnist1d:quick")
    c.model.activation = "gelu"  # without the opt-in its units would go unrecorded
    with pytest.raises(base.ConfigError, match=r"must include model\.activation='gelu'"):
        base.validate_config(c)
    c = configs.load("transformer_gelu_mnist1d:quick")
    base.validate_config(c)
    assert c.model.activation == "gelu" and tuple(c.record.activations) == ("gelu",)


def test_transformer_gelu_ffn_site_and_capture_agree():
    cfg = dict(configs.load("transformer_gelu_mnist1d:quick").model)
    model = models.create_model(cfg, 10)
    x = jax.random.normal(jax.random.key(2), (3, 40))
    variables = model.init(jax.random.key(0), x)
    preacts = capture_relus(model.apply, activations=("gelu",))(variables, x)[1]
    assert list(preacts) == ["block0/ffn/fc1:gelu"]
    sown = models.preacts_of(model, variables["params"], x)
    assert list(sown) == list(preacts)
    np.testing.assert_array_equal(sown["block0/ffn/fc1:gelu"], preacts["block0/ffn/fc1:gelu"])
    with pytest.raises(CaptureError, match="no ReLU found"):
        capture_relus(model.apply)(variables, x)
    with pytest.raises(ValueError, match=r"model\.activation=.tanh.*allowed values"):
        models.create_model(cfg | {"activation": "tanh"}, 10)
