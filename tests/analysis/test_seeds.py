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
    vals = list(np.random.default_rng(1).normal(size=8))
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
