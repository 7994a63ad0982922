"""Tests for regime_jax.analysis.seeds (mean, median and bootstrap CI over seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from regime_jax.analysis.seeds import seed_stats


def test_seed_stats_basic() -> None:
    s = seed_stats([3.1, 2.9, None, 3.4, float("nan"), 2.6, 3.0])
    assert s.n == 5 and s.n_dropped == 2 and s.values == (3.1, 2.9, 3.4, 2.6, 3.0)
    assert s.mean == pytest.approx(3.0) and s.median == pytest.approx(3.0)
    assert s.method == "bootstrap"
    assert s.ci_low < s.mean < s.ci_high
    assert s.ci_low >= 2.6 and s.ci_high <= 3.4


def test_seed_stats_ci_narrows_with_confidence() -> None:
    vals = list(np.random.default_rng(0).normal(3.85, 0.5, size=10))
    wide, narrow = seed_stats(vals, 0.99), seed_stats(vals, 0.5)
    assert wide.ci_high - wide.ci_low > narrow.ci_high - narrow.ci_low


def test_seed_stats_deterministic() -> None:
    vals = list(np.random.default_rng(1).lognormal(size=8))  # positive: no NaN geo mean
    assert seed_stats(vals, seed=3) == seed_stats(vals, seed=3)
    assert seed_stats(vals, seed=3).ci_low != seed_stats(vals, seed=4).ci_low


def test_seed_stats_small_n() -> None:
    one = seed_stats([None, 2.5])
    assert (one.n, one.n_dropped, one.mean, one.median, one.method) == (1, 1, 2.5, 2.5, "none")
    assert math.isnan(one.ci_low) and math.isnan(one.ci_high)
    zero = seed_stats([None, float("inf")])
    assert zero.n == 0 and zero.n_dropped == 2 and zero.values == ()
    assert all(math.isnan(v) for v in (zero.mean, zero.median, zero.ci_low, zero.ci_high))
    assert zero.to_dict()["values"] == []


def test_seed_stats_validation() -> None:
    with pytest.raises(ValueError, match="confidence"):
        seed_stats([1.0, 2.0], confidence=1.5)


def test_geometric_mean_and_median_resist_one_heavy_seed() -> None:
    # the CNN / Adam per-seed ratios of the 140-run reproduction: one seed drives the mean
    ratios = [1.4, 10.7, 5.7, 0.9, 9.9]
    s = seed_stats(ratios)
    assert s.mean == pytest.approx(np.mean(ratios))
    assert s.geo_mean == pytest.approx(math.exp(np.mean(np.log(ratios))))
    assert s.median == 5.7 and s.geo_mean < s.mean
    for lo, mid, hi in [
        (s.ci_low, s.mean, s.ci_high),
        (s.median_ci_low, s.median, s.median_ci_high),
        (s.geo_ci_low, s.geo_mean, s.geo_ci_high),
    ]:
        assert min(ratios) <= lo <= mid <= hi <= max(ratios)
    # a ratio and its inverse are symmetric about 1 for the geometric mean, not the mean
    inv = seed_stats([1 / r for r in ratios])
    assert inv.geo_mean == pytest.approx(1 / s.geo_mean)
    assert inv.geo_ci_low == pytest.approx(1 / s.geo_ci_high, rel=0.05)
    assert inv.mean != pytest.approx(1 / s.mean, rel=0.05)


def test_geometric_mean_needs_positive_values() -> None:
    s = seed_stats([-0.5, 1.0, 2.0])  # a signed quantity (an accuracy gap)
    assert math.isnan(s.geo_mean) and math.isnan(s.geo_ci_low) and s.mean == pytest.approx(5 / 6)
    assert s.to_dict()["geo_mean"] != s.to_dict()["geo_mean"]  # NaN in the dict
    one = seed_stats([2.0])
    assert one.geo_mean == 2.0 and math.isnan(one.geo_ci_low) and math.isnan(one.median_ci_low)
