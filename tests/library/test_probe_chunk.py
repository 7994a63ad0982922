"""The chunked probe forward (``pattern_monitor(..., probe_chunk=N)``) and the counts of large
masks in blocks of examples: the same bits and counts as one pass, for any P, N and shape."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import regime_jax as rj
from regime_jax import analyzer, bitmask
from regime_jax.bitmask import Packed
from regime_jax.configs.base import ConfigError, base_config, validate_config


def _model(positions: int, widths: tuple[int, int]):
    """Two ReLU layers over ``positions`` token positions (none: an MLP), a capture_relus fn."""
    k = jax.random.split(jax.random.key(len(widths) + positions), 2)
    params = {"w": jax.random.normal(k[0], (4, widths[0])), "v": jax.random.normal(k[1], widths)}

    def apply_fn(p, x):
        h = jnp.maximum(x @ p["w"], 0.0)
        return jnp.maximum(h @ p["v"], 0.0).sum(-1)

    return rj.capture_relus(apply_fn), params


def _probe(num: int, positions: int, seed: int):
    shape = (num, 4) if positions == 0 else (num, positions, 4)
    x = jax.random.normal(jax.random.key(seed), shape)
    return x.at[0].set(0.0)  # exact zeros: off bits on a row every chunking must keep


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], Packed):
            assert a[k].units == b[k].units and a[k].bits.shape == b[k].bits.shape, k
            np.testing.assert_array_equal(np.asarray(a[k].bits), np.asarray(b[k].bits), err_msg=k)
        else:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@settings(max_examples=10, deadline=None)
@given(
    num=st.integers(1, 23),
    chunk=st.integers(1, 25),
    positions=st.sampled_from([0, 1, 3]),
    widths=st.sampled_from([(5, 3), (9, 16), (1, 12)]),
    seed=st.integers(0, 3),
)
def test_chunked_masks_flips_and_counts_equal_one_pass(num, chunk, positions, widths, seed):
    preacts_fn, params = _model(positions, widths)
    x0, x1 = _probe(num, positions, seed), _probe(num, positions, seed + 10)
    updates = jax.tree.map(lambda a: 0.3 * jnp.ones_like(a), params)
    new = jax.tree.map(jnp.add, params, updates)
    out = {}
    for name, pc in (("one", None), ("chunked", chunk)):
        mon = rj.pattern_monitor(preacts_fn, x0, probe_chunk=pc)
        state = mon.init(params)
        metrics, state2 = jax.jit(lambda s, v, u, x, m=mon: m.update(s, v, u, probe_x=x))(
            state, new, updates, x1
        )
        out[name] = (state.masks, state2.masks, metrics)
    for a, b in zip(out["one"], out["chunked"], strict=True):
        _same(a, b)


def test_chunk_sizes_are_even_and_auto_keeps_a_small_probe_in_one_pass():
    assert analyzer.probe_chunk_size(8, 100, 30) == 25  # 4 chunks of 25, not 30 + 30 + 30 + 10
    assert analyzer.probe_chunk_size(8, 100, 100) == 100
    assert analyzer.probe_chunk_size(8, 100, None) == 100
    budget = analyzer.PROBE_CHUNK_BYTES
    assert analyzer.probe_chunk_size(budget // 8, 512, "auto") == 8
    assert analyzer.probe_chunk_size(1024, 512, "auto") == 512  # 512 KiB of preacts: one pass
    for bad in (0, -1, True, 2.5, "big"):
        with pytest.raises(ValueError, match="probe_chunk"):
            rj.pattern_monitor(lambda p, x: (x, {"a": x}), jnp.ones((2, 2)), probe_chunk=bad)


def test_the_chunked_program_holds_one_chunk_not_the_probe_set():
    """Compiled temporary memory: one pass grows with P, chunks of 4 do not (shapes only)."""
    preacts_fn, params = _model(16, (64, 64))

    def temp(num, pc):
        x = jnp.zeros((num, 16, 4))
        mon = rj.pattern_monitor(preacts_fn, x, probe_chunk=pc)
        compiled = jax.jit(mon.init).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    one = temp(2048, None) - temp(1024, None)
    chunked = temp(2048, 4) - temp(1024, 4)
    assert one >= 1024 * 16 * 64 * 4  # at least the extra float32 preacts of a layer
    assert chunked <= 1024 * 16 * 2 * 8 * 2  # the extra masks (and a padded copy), no preacts


def _packed(rng, shape):
    return jnp.asarray(rng.integers(0, 256, shape, dtype=np.uint8))


@pytest.mark.parametrize("rows", [1, 3, 7])
@pytest.mark.parametrize("shape,units", [((11, 3), 20), ((10, 2, 2), 13), ((9, 1), 1)])
def test_counts_in_blocks_of_examples_equal_one_pass(monkeypatch, rows, shape, units):
    rng = np.random.default_rng(rows)
    a, b = _packed(rng, shape), _packed(rng, shape)
    a = a.at[:, ...].set(a | _packed(rng, shape))  # skew towards on: always-on sites exist
    ref_flip = int(np.unpackbits(np.asarray(a ^ b), -1, units, "little").sum())
    on = np.unpackbits(np.asarray(a), -1, units, "little")
    ref_on, ref_dead = int(on.min(0).sum()), int((1 - on.max(0)).sum())
    row_bytes = int(np.prod(shape[1:]))
    monkeypatch.setattr(bitmask, "BLOCK_BYTES", rows * row_bytes)
    for fn in (lambda f, *x: f(*x), lambda f, *x: jax.jit(f, static_argnums=len(x) - 1)(*x)):
        assert int(fn(bitmask.flip_count, a, b, units)) == ref_flip
        assert int(fn(bitmask.always_on, a, units)) == ref_on
        assert int(fn(bitmask.dead, a, units)) == ref_dead
    if rows < shape[0]:  # the blocked program really ran: one pass has no loop
        text = jax.jit(bitmask.dead, static_argnums=1).lower(a, units).as_text()
        assert "while" in text


def test_config_probe_chunk_is_validated_and_defaults_to_auto():
    from regime_jax.run import step

    c = base_config()
    assert c.record.probe_chunk == 0 and step.monitor_options_of(c) == step.MonitorOptions()
    c.record.probe_chunk = 64
    validate_config(c)
    assert step.monitor_options_of(c).probe_chunk == 64
    for bad in (-1, 2**31, True):
        c = base_config()
        c.record.probe_chunk = bad
        with pytest.raises(ConfigError, match=r"record\.probe_chunk.*allowed values"):
            validate_config(c)


SHARDED = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    import regime_jax as rj
    apply_fn = lambda p, x: jnp.maximum(jnp.maximum(x @ p["w"], 0.0) @ p["v"], 0.0).sum(-1)
    k = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(k[0], (4, 12)), "v": jax.random.normal(k[1], (12, 9))}
    from jax.sharding import AxisType
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    data = NamedSharding(mesh, PartitionSpec("data"))
    x = jax.device_put(jax.random.normal(k[2], (40, 3, 4)), data)
    updates = jax.tree.map(lambda a: 0.2 * jnp.ones_like(a), params)
    new = jax.tree.map(jnp.add, params, updates)
    got = []
    for pc in (None, 3, 5):
        mon = rj.pattern_monitor(rj.capture_relus(apply_fn), x, probe_chunk=pc)
        s = jax.jit(mon.init)(params)
        m, s2 = jax.jit(lambda s, v, u, x: mon.update(s, v, u, probe_x=x))(s, new, updates, x)
        got.append([np.asarray(s2.masks[l].bits) for l in sorted(s2.masks)] + [
            np.asarray(m[key]) for key in sorted(m)])
    for other in got[1:]:
        for a, b in zip(got[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
    print("ok", len(jax.devices()))
    """
)


def test_chunked_monitor_on_a_sharded_probe_gives_the_one_pass_bits():
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "8"]


def test_probe_chunk_is_not_part_of_what_a_run_is():
    """A memory setting: the fingerprint (resume, sweeps) leaves it out, so a run written
    before the field existed, or with another chunk, resumes."""
    from regime_jax.run import fingerprint, loop

    a, b = base_config(), base_config()
    b.record.probe_chunk = 7
    fa = fingerprint.make(a.to_dict(), None, loop.RESUME_IGNORES)
    fb = fingerprint.make(b.to_dict(), None, loop.RESUME_IGNORES)
    assert "probe_chunk" not in fa["config"]["record"] and fa == fb
    assert fa["config"]["record"]["every_steps"] == 1  # the rest of the block stays
    old = {**fa, "config": {**fa["config"], "record": dict(fa["config"]["record"])}}
    for field in ("sample_units", "sample_positions", "sample_seed"):
        del old["config"]["record"][field]  # a run from before sampling existed
    assert fingerprint.diff(old, fa) == [] and fingerprint.diff(fa, old) == []
    b.record.sample_units = 5  # sampling changes the records: part of the fingerprint
    fb = fingerprint.make(b.to_dict(), None, loop.RESUME_IGNORES)
    assert fb["config"]["record"]["sample_units"] == 5 and fingerprint.diff(fa, fb) == [
        "record.sample_units"
    ]
