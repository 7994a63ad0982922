"""Sampled monitoring (``sample_units``, ``sample_positions``): the sample's bits are the full
patterns' bits at the kept indices, and the full-set flip rate lies within 3 standard errors
of the sampled one for nearly every seed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import regime_jax as rj
from regime_jax import analyzer
from regime_jax.bitmask import Packed


def _model():
    k = jax.random.split(jax.random.key(7), 3)
    params = {"w": jax.random.normal(k[0], (4, 40))}
    x = jax.random.normal(k[1], (6, 10, 4))
    apply_fn = lambda p, x: jnp.maximum(x @ p["w"], 0.0).sum((-2, -1))
    return rj.capture_relus(apply_fn), params, x


def test_sampled_masks_are_the_full_masks_at_the_kept_indices():
    preacts_fn, params, x = _model()
    full = rj.pattern_monitor(preacts_fn, x)
    sampled = rj.pattern_monitor(preacts_fn, x, sample_units=7, sample_positions=3, sample_seed=5)
    index = sampled.update.sample(params)["w"]
    assert len(index["units"]) == 7 and len(index["positions"]) == 3
    np.testing.assert_array_equal(index["units"], sampled.update.sample(params)["w"]["units"])
    bits = full.init(params).masks["w"].unpack()  # [6, 10, 40]
    got = sampled.init(params).masks["w"].unpack()  # [6, 3, 7]
    want = bits[:, index["positions"]][..., index["units"]]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    other = rj.pattern_monitor(preacts_fn, x, sample_units=7, sample_seed=6).update.sample(params)
    assert not np.array_equal(other["w"]["units"], index["units"])
    assert other["w"]["positions"] is None  # positions not sampled: all kept

    new = jax.tree.map(lambda a: a + 0.5, params)
    updates = jax.tree.map(lambda a: 0.5 * jnp.ones_like(a), params)
    metrics, _ = sampled.update(sampled.init(params), new, updates)
    assert {"flip_se/w", "flip_se/all"} <= set(metrics)
    full_metrics, _ = full.update(full.init(params), new, updates)
    assert not any(k.startswith("flip_se/") for k in full_metrics)  # default: unchanged keys
    before, after = full.init(params).masks["w"].unpack(), full.init(new).masks["w"].unpack()
    flips = np.asarray(before != after)[:, index["positions"]][..., index["units"]]
    assert int(metrics["flip_count/w"]) == int(flips.sum())


def test_bad_sample_sizes_are_refused():
    preacts_fn, _, x = _model()
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ValueError, match="sample_units"):
            rj.pattern_monitor(preacts_fn, x, sample_units=bad)


def _synthetic(seed=0, num=16, positions=64, units=256):
    """Flips whose rate varies by unit (Beta-distributed) and by position (x 0.5 .. 1.5)."""
    rng = np.random.default_rng(seed)
    p_u = rng.beta(0.6, 6.0, units)
    p_s = rng.uniform(0.5, 1.5, positions)
    prob = np.clip(p_s[:, None] * p_u[None, :], 0, 1)
    prev = rng.random((num, positions, units)) < 0.5
    flip = rng.random((num, positions, units)) < prob
    return prev, prev ^ flip


@pytest.mark.parametrize("k,m", [(32, 8), (64, 64), (256, 8)])
def test_full_flip_rate_lies_within_3_standard_errors_of_the_sample(k, m):
    """Over 200 sampling seeds, the full-set rate is within +-3 SE of the sampled rate in at
    least 95% of them (measured: 97-99.5%; a normal interval would cover 99.7%, but the SE of
    8 positions has 7 degrees of freedom, t-like tails)."""
    prev, cur = _synthetic()
    _, positions, units = prev.shape
    truth = (prev != cur).mean()
    inside, seeds = 0, 200
    for seed in range(seeds):
        idx = analyzer.sample_indices({"l": prev.shape}, k, m, seed)["l"]
        take = lambda b, idx=idx: analyzer.sample_preacts(jnp.asarray(b, jnp.float32), idx) > 0
        a, b = Packed.from_bool(take(prev)), Packed.from_bool(take(cur))
        frac = (k / units, m / positions)
        se = float(analyzer.flip_standard_errors({"l": a}, {"l": b}, {"l": frac})["flip_se/l"])
        rate = float(analyzer.flip_rates({"l": a}, {"l": b})["l"])
        assert se > 0 or (k, m) == (units, positions)
        inside += abs(rate - truth) <= 3 * se
    assert inside / seeds >= 0.95, inside


def test_standard_error_is_zero_when_nothing_is_sampled_and_shrinks_with_the_sample():
    prev, cur = _synthetic(1)
    units = prev.shape[-1]
    whole = {"l": Packed.from_bool(jnp.asarray(prev))}, {"l": Packed.from_bool(jnp.asarray(cur))}
    se = analyzer.flip_standard_errors(*whole, {"l": (1.0, 1.0)})
    assert float(se["flip_se/l"]) == 0.0 and float(se["flip_se/all"]) == 0.0
    widths = []
    for k in (16, 64, 192):
        ses = []
        for seed in range(20):
            idx = analyzer.sample_indices({"l": prev.shape}, k, None, seed)["l"]
            take = lambda b, idx=idx: analyzer.sample_preacts(jnp.asarray(b, jnp.float32), idx) > 0
            pair = {"l": Packed.from_bool(take(prev))}, {"l": Packed.from_bool(take(cur))}
            ses.append(
                float(analyzer.flip_standard_errors(*pair, {"l": (k / units, 1.0)})["flip_se/l"])
            )
        widths.append(np.median(ses))
    assert widths[0] > widths[1] > widths[2] > 0


def test_a_sampled_run_records_its_indices_and_standard_errors(tmp_path):
    """The built-in loop: record.sample_* writes sample.json and flip_se/* beside flip/*; the
    snapshots hold the sampled bits; a run without sampling has neither."""
    import json

    from conftest import tiny_config

    from regime_jax import records
    from regime_jax.run import loop

    c = tiny_config(**{"record.sample_units": 5, "record.sample_seed": 3})
    loop.train_and_evaluate(c, tmp_path / "s")
    sample = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert sorted(sample) == ["fc1", "fc2"]
    assert len(sample["fc1"]["units"]) == 5 and sample["fc1"]["positions"] is None
    want = analyzer.sample_indices({"fc1": (24, 16), "fc2": (24, 12)}, 5, None, 3)
    assert sample["fc1"]["units"] == want["fc1"]["units"].tolist()
    rows = [json.loads(r) for r in (tmp_path / "s" / records.METRICS).read_text().splitlines()]
    flips = [r for r in rows if "flip/fc1" in r]
    assert flips and all({"flip_se/fc1", "flip_se/all"} <= set(r) for r in flips)
    assert all(0 <= r["flip_count/fc1"] <= 24 * 5 for r in flips)
    loop.train_and_evaluate(tiny_config(), tmp_path / "full")
    assert not (tmp_path / "full" / "sample.json").exists()
    full = (tmp_path / "full" / records.METRICS).read_text()
    assert "flip_se" not in full


def test_sample_fields_are_validated():
    from regime_jax.configs.base import ConfigError, base_config, validate_config

    for field, bad in (("sample_units", -1), ("sample_positions", 2**31), ("sample_seed", -3)):
        c = base_config()
        c.record[field] = bad
        with pytest.raises(ConfigError, match=f"record.{field}"):
            validate_config(c)
