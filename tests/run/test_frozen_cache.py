"""The cached frozen phase (issue 24, part 5): gate bits of every training example cached at
the freeze, the values trained under them with no gate forward.

The maths is the gated path's (``where(z_g > 0, z_v, 0)`` with ``z_g > 0`` read from the
cache), so a run takes the same records either way; the cache is rebuilt on resume.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from regime_jax import data, records
from regime_jax.run import loop, step

F = 5
CKPT = {"checkpoint.every_steps": 2, "checkpoint.keep": 20}


def _same_records(a: Path, b: Path) -> None:
    assert (a / records.METRICS).read_text() == (b / records.METRICS).read_text()
    names = sorted(p.name for p in (a / records.MASKS_DIR).glob("*.npz"))
    assert names and names == sorted(p.name for p in (b / records.MASKS_DIR).glob("*.npz"))
    for name in names:
        ma, mb = (records.read_masks(d / records.MASKS_DIR / name) for d in (a, b))
        for k in ma:
            np.testing.assert_array_equal(ma[k].bits, mb[k].bits)


def _timing(workdir: Path) -> dict:
    return json.loads((workdir / records.TIMING).read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny run frozen at F, cached (the default) and gated (decouple.cache='off')."""
    out = {}
    for cache in ("auto", "off"):
        workdir = tmp_path_factory.mktemp(cache)
        config = tiny_config(**CKPT, **{"decouple.freeze_step": F, "decouple.cache": cache})
        loop.train_and_evaluate(config, workdir)
        out[cache] = workdir
    return out


def test_cached_and_gated_runs_write_the_same_records(runs):
    """Bit for bit: the masked forward binds the same ops as the gated value stream."""
    _same_records(runs["auto"], runs["off"])
    rows = records.read_rows(runs["auto"])
    assert rows[-1]["decouple/freeze_step"] == F


def test_timing_says_which_path_the_frozen_phase_took(runs):
    cached, gated = _timing(runs["auto"]), _timing(runs["off"])
    assert cached["frozen_path"] == "cached" and gated["frozen_path"] == "gated"
    # 4000 training + 24 probe examples x (16 + 12 units -> 2 + 2 bytes)
    assert cached["cache_bytes"] == (4000 + 24) * 4
    assert cached["data_bytes"] == 4000 * (40 + 1) * 4  # the training split, on device
    assert cached["cache_build_seconds"] > 0
    assert "decouple.cache='off'" in gated["why"]


def test_a_run_resumed_after_the_freeze_rebuilds_the_cache(runs, tmp_path):
    """Killed between the freeze and the end: the resumed run has the same bytes (the cache
    is a pure function of the gates and the data, never checkpointed)."""
    shutil.copytree(runs["auto"], tmp_path / "cut")
    for d in (tmp_path / "cut" / "checkpoints").iterdir():
        if d.name.isdigit() and int(d.name) > 8:
            shutil.rmtree(d)
    (tmp_path / "cut" / records.SUMMARY).unlink()
    config = tiny_config(**CKPT, **{"decouple.freeze_step": F})
    loop.train_and_evaluate(config, tmp_path / "cut")
    _same_records(runs["auto"], tmp_path / "cut")
    assert _timing(tmp_path / "cut")["frozen_path"] == "cached"


def test_a_cache_over_budget_falls_back_to_the_gates(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "CACHE_MAX_BYTES", 1000)
    loop.train_and_evaluate(tiny_config(**CKPT, **{"decouple.freeze_step": F}), tmp_path)
    assert "frozen phase gated" in capsys.readouterr().out
    timing = _timing(tmp_path)
    size = (4000 + 24) * 4 + 4000 * (40 + 1) * 4  # gate bits, training split
    assert timing["frozen_path"] == "gated" and f"{size} bytes would exceed 1000" in timing["why"]
    _same_records(runs["off"], tmp_path)


def _frozen_state(config):
    """A tiny model's state frozen after 3 ordinary steps, with what its steps need."""
    setup = loop.build(config)
    ds, net, tx = setup.ds, setup.net, setup.tx
    probe = {"x": jnp.asarray(ds.x_val[setup.probe_idx])}
    state = step.create_train_state(net, tx, jax.random.key(0), probe["x"], decoupled=True)
    ordinary = step.make_step_fns(net, tx)[True]
    batches = data.batches(ds, config.batch_size, config.seed, index=True)
    for _ in range(3):
        b = next(batches)
        state = ordinary(state, {"x": b["x"], "y": b["y"]}, probe)[0]
    frozen = jax.tree.map(jnp.copy, step.freeze(state, probe["x"], model=net))
    return setup, frozen, probe, batches


def test_k_cached_steps_equal_k_gated_steps_from_the_same_state():
    """Params after K frozen steps, each path from the same state: equal to float32
    rounding (tolerance 1e-6 relative: XLA may fuse the two programs differently; on CPU
    they are bit-identical), and the same eval accuracy."""
    config = tiny_config(**{"decouple.freeze_step": 3})
    setup, state, probe, batches = _frozen_state(config)
    net, tx, masked = setup.net, setup.tx, setup.masked_net
    assert masked is not None
    gates = jax.tree.map(jnp.copy, state.frozen.gates)  # the steps donate their state
    bits = masked.gate_bits(gates, jnp.asarray(setup.ds.x_train))
    x, y = jnp.asarray(setup.ds.x_train), jnp.asarray(setup.ds.y_train)
    cache = step.GateCache(bits, masked.gate_bits(gates, probe["x"]), x, y)
    gated_fn = step.make_step_fns(net, tx, gated_net=setup.gated_net)[True]
    cached_fn = step.make_step_fns(net, tx, gated_net=setup.gated_net, masked_net=masked)[True]
    a, b = (jax.tree.map(jnp.copy, state) for _ in range(2))
    for _ in range(6):
        batch = next(batches)
        a, ma, _ = gated_fn(a, {"x": batch["x"], "y": batch["y"]}, probe)
        b, mb, _ = cached_fn(b, {"idx": batch["idx"]}, probe | {"cache": cache})
        assert set(ma) == set(mb)
        for k in ma:
            np.testing.assert_allclose(np.asarray(mb[k]), np.asarray(ma[k]), rtol=1e-6, atol=0)
    moved = jax.tree.leaves(jax.tree.map(lambda x, y: bool((x != y).any()), a.params, gates))
    assert any(moved)  # the values trained
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)
    x_val, y_val = setup.ds.x_val, setup.ds.y_val
    acc = lambda logits: float(jnp.mean(jnp.argmax(logits, -1) == y_val))
    gated = acc(setup.gated_net.apply(a.params, gates, x_val))
    cached = acc(masked.apply(b.params, masked.gate_bits(gates, x_val), x_val))
    assert cached == gated
    # the test can fail: another example's gate bits (the data right) give other params
    bad = cache.replace(train=jax.tree.map(lambda b: jnp.roll(b, 1, axis=0), cache.train))
    batch = next(batches)
    c = cached_fn(jax.tree.map(jnp.copy, state), {"idx": batch["idx"]}, probe | {"cache": bad})[0]
    d = gated_fn(jax.tree.map(jnp.copy, state), {"x": batch["x"], "y": batch["y"]}, probe)[0]
    pairs = zip(jax.tree.leaves(c.params), jax.tree.leaves(d.params), strict=True)
    assert any(not np.allclose(x, y) for x, y in pairs)


def test_sign_patterns_beyond_relu_keep_the_gated_path():
    """A GELU site's frozen form is z_values * Phi(z_gates), not a bit: no cache, said why."""
    from regime_jax import configs

    config = configs.load("transformer_gelu_mnist1d:quick")
    config.decouple.freeze_step = 5
    setup = loop.build(config)
    assert setup.masked_net is None
    assert setup.frozen_path.startswith("gated") and "record.activations" in setup.frozen_path
