"""Tests for regime_jax.analysis.online (the causal settle detector)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regime_jax.analysis import timescales
from regime_jax.analysis.online import OnlineConfig, OnlineSettle, online_settle_time


@pytest.mark.parametrize(
    ("tau", "window", "fraction", "patience"),
    [(100, 25, 0.1, 10), (37, 5, 0.3, 1), (250, 40, 0.05, 20)],
)
def test_online_detector_on_an_exponential_matches_the_analytic_step(
    tau, window, fraction, patience
):
    t = np.arange(5000)
    cfg = OnlineConfig(window=window, fraction=fraction, patience=patience)
    got = online_settle_time(t, np.exp(-t / tau), cfg)
    expected = math.ceil((window - 1) + tau * math.log(1 / fraction) + (patience - 1) - 1e-9)
    assert got.status == "ok" and got.time == pytest.approx(expected, abs=1)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    window=st.integers(1, 30),
    patience=st.integers(1, 15),
    fraction=st.floats(0.05, 0.6),
)
def test_online_detector_uses_no_future_data(seed, window, patience, fraction):
    rng = np.random.default_rng(seed)
    n = 600
    t = np.arange(n)
    values = np.exp(-t / rng.uniform(20, 200)) * rng.uniform(0.5, 1.5, n) + rng.uniform(0, 0.02)
    cfg = OnlineConfig(window=window, fraction=fraction, patience=patience)
    full = online_settle_time(t, values, cfg)
    if full.status != "ok":
        return
    k = int(full.time)
    truncated = online_settle_time(t[: k + 1], values[: k + 1], cfg)
    assert truncated.time == full.time  # nothing after the trigger was read
    # and changing every value after the trigger changes nothing either
    changed = values.copy()
    changed[k + 1 :] = rng.uniform(0, 10, n - k - 1)
    assert online_settle_time(t, changed, cfg).time == full.time


def test_online_detector_measures_from_the_peak_and_reports_never_and_nonfinite():
    t = np.arange(400)
    rise_then_fall = np.where(t < 50, t / 50.0, np.exp(-(t - 50) / 30.0))
    got = online_settle_time(t, rise_then_fall, OnlineConfig(window=5, fraction=0.1, patience=1))
    assert got.status == "ok" and 50 + 30 * math.log(10) <= got.time <= 50 + 30 * math.log(10) + 10
    flat = online_settle_time(t, np.ones(400), OnlineConfig())
    assert flat.status == "never_settles" and flat.time is None
    bad = online_settle_time(t, np.where(t == 7, np.nan, 1.0), OnlineConfig())
    assert bad.status == "nonfinite"
    detector = OnlineSettle(OnlineConfig(window=1, fraction=0.5, patience=1))
    assert [detector.update(s, v) for s, v in enumerate([1.0, 0.4, 0.1])] == [False, True, False]
    assert detector.trigger == 1.0  # fires once, then stays fired
    with pytest.raises(ValueError, match=r"OnlineConfig\.fraction "):
        OnlineConfig(fraction=1.5)


def test_moved_names_still_import_from_timescales():
    from regime_jax.analysis import seeds

    assert timescales.OnlineSettle is OnlineSettle
    assert timescales.online_settle_time is online_settle_time
    assert timescales.seed_stats is seeds.seed_stats
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = timescales.nothing
