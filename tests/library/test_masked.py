"""The masked forward (capture.mask_relus, gating.masked_net): the gated transform with the
gates' bits given instead of computed, the cached frozen phase's forward (issue 24, part 5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BUILTIN

import regime_jax as rj
from regime_jax import capture, gating, models


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.heavy) if n == "transformer" else n for n in BUILTIN]
)
def test_masked_net_is_the_gated_net_without_the_gate_forward(name):
    """Output bit for bit and the values' gradient, every built-in family, under jit."""
    model_cfg, shape = BUILTIN[name]
    model = models.create_model(model_cfg, 3)
    x = jax.random.normal(jax.random.key(1), shape)
    values = model.init(jax.random.key(2), x)["params"]
    gates = model.init(jax.random.key(3), x)["params"]
    gated, masked = gating.gated_net(model), gating.masked_net(model)
    bits = jax.jit(masked.gate_bits)(gates, x)
    out_m = jax.jit(masked.apply)(values, bits, x)
    np.testing.assert_array_equal(_bits(out_m), _bits(jax.jit(gated.apply)(values, gates, x)))
    assert not np.array_equal(out_m, model.apply({"params": values}, x))  # gates matter here
    g1 = jax.jit(jax.grad(lambda v: gated.apply(v, gates, x).sum()))(values)
    g2 = jax.jit(jax.grad(lambda v: masked.apply(v, bits, x).sum()))(values)
    for p, q in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(q), np.asarray(p), rtol=1e-6, atol=1e-7)
    _, z_v, _ = gated.preacts_fn(values, gates, x)
    _, z_m = masked.preacts_fn(values, bits, x)
    assert list(z_m) == list(z_v)
    for k in z_v:
        np.testing.assert_array_equal(np.asarray(z_m[k]), np.asarray(z_v[k]), err_msg=k)


def test_custom_vjp_nested_jit_and_checkpoint_are_masked():
    """A custom derivative rule gives way to the mask, as it does to the gate bit."""

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
    _, _, z_g = rj.gate_relus(fn)(values, gates, x)
    masks = {k: z > 0 for k, z in z_g.items()}
    assert list(masks) == ["relu_0", "relu_1", "relu_2"]
    gated = lambda v: rj.gate_relus(fn)(v, gates, x)[0]
    masked = lambda v: capture.mask_relus(fn)(v, masks, x)[0]
    np.testing.assert_array_equal(np.asarray(masked(values)), np.asarray(gated(values)))
    g1 = jax.grad(lambda v: gated(v).sum())(values)
    g2 = jax.grad(lambda v: masked(v).sum())(values)
    np.testing.assert_allclose(g2, g1, rtol=1e-6, atol=1e-7)


def test_a_non_leading_probe_axis_takes_probe_major_masks():
    """Masks are probe-major like capture's preacts, whatever axis the examples traced on."""

    def fn(p, x):  # examples on axis 1 of the pre-activation
        return jnp.maximum(jnp.einsum("bi,ij->jb", x, p), 0.0).sum(0)

    x = jax.random.normal(jax.random.key(1), (5, 3))
    p = jax.random.normal(jax.random.key(2), (3, 4))
    masks = {"relu_0": jnp.arange(20).reshape(5, 4) % 3 == 0}  # [P, units]
    out, z = capture.mask_relus(fn)(p, masks, x)
    assert z["relu_0"].shape == (5, 4)
    np.testing.assert_allclose(out, jnp.where(masks["relu_0"], x @ p, 0.0).sum(1), rtol=1e-6)


def test_mask_relus_refuses_scans_and_wrong_masks():
    def scanned(p, x):
        h, _ = jax.lax.scan(lambda h, w: (jax.nn.relu(h @ w), None), x, p)
        return h

    x, p = jnp.ones((2, 3)), jnp.ones((2, 3, 3))
    with pytest.raises(capture.CaptureError, match="inside a scan"):
        capture.mask_relus(scanned)(p, {}, x)
    fn = lambda p, x: jnp.maximum(x @ p, 0.0)
    with pytest.raises(ValueError, match="masks have layers"):
        capture.mask_relus(fn)(jnp.ones((3, 4)), {"q": jnp.ones((2, 4), bool)}, x)
    with pytest.raises(ValueError, match=r"has shape \(2, 3\), its pre-activation \(2, 4\)"):
        capture.mask_relus(fn)(jnp.ones((3, 4)), {"relu_0": jnp.ones((2, 3), bool)}, x)
