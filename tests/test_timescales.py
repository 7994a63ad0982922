"""Tests for regime_jax.timescales (smoothing, decay times, lag ratio)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regime_jax.timescales import (
    RULES,
    DecayConfig,
    DecayResult,
    analyze_series,
    decay_time,
    decay_times_all_rules,
    lag_ratio,
    smooth,
)

LN10 = math.log(10.0)
STEPS = np.arange(3000.0)


def _exp(tau: float, noise: float = 0.0, seed: int = 0, steps: np.ndarray = STEPS) -> np.ndarray:
    x = np.exp(-(steps - steps[0]) / tau)
    if noise:
        x = x + noise * np.random.default_rng(seed).standard_normal(steps.size)
    return x


# ---------------------------------------------------------------- smoothing


def test_smooth_reproduces_linear_trend_including_edges() -> None:
    x = 3.0 * np.arange(100.0) - 7.0
    np.testing.assert_allclose(smooth(x, 25), x, atol=1e-9)


def test_smooth_averages_noise_and_keeps_length() -> None:
    x = np.random.default_rng(0).standard_normal(2000)
    y = smooth(x, 25)
    assert y.shape == x.shape
    # interior is the 25-point mean: std ~ 1/5; edges (linear fit) ~ 2/5
    assert np.std(y[12:-12]) < 0.3
    assert np.max(np.abs(y[:12])) < 2.0 and np.max(np.abs(y[-12:])) < 2.0
    np.testing.assert_allclose(y[500], np.mean(x[488:513]))


# ------------------------------------------------------- known time constants


@pytest.mark.parametrize("tau", [50.0, 100.0, 200.0, 300.0])
def test_settle_exponential_matches_tau_ln10(tau: float) -> None:
    # Exact answer tau*ln(10). Allowed error: 1 step of discretization, the
    # smoothing shift tau*ln(sinh(a)/a) ~ h^2/(6 tau) <= 0.5 steps (h = 12), and
    # the edge line fit lowering the smoothed start (range shrinks by < 1%):
    # together < 2% + 2 steps for tau >= 50.
    res = decay_time(STEPS, _exp(tau))
    assert res.status == "ok", res
    assert abs(res.time - tau * LN10) <= 0.02 * tau * LN10 + 2.0


@pytest.mark.parametrize("rule", ["cumsum", "threshold"])
@pytest.mark.parametrize("tau", [50.0, 150.0, 300.0])
def test_other_rules_exponential_match_tau_ln10(rule: str, tau: float) -> None:
    # threshold: exp(-T/tau) = 0.1; cumsum: 1 - exp(-T/tau) = 0.9 (tail beyond 3000
    # steps is < e^-10). Same error budget as the settle rule.
    res = decay_time(STEPS, _exp(tau), DecayConfig(rule=rule))
    assert res.status == "ok", res
    assert abs(res.time - tau * LN10) <= 0.02 * tau * LN10 + 2.0


def test_cumsum_clips_negative_values() -> None:
    # the unclipped sum is 100 - 150 < 0; clipped, 90% of the positive mass lies
    # before the zero crossing at t = tau*ln(20) ~ 300
    res = decay_time(STEPS, _exp(100.0) - 0.05, DecayConfig(rule="cumsum"))
    assert res.status == "ok" and res.time < 300.0


@pytest.mark.parametrize("tau,seed", [(50.0, 1), (100.0, 2), (300.0, 3)])
def test_settle_noisy_exponential_matches_tau_ln10(tau: float, seed: int) -> None:
    # Noise sigma 0.01 -> ~0.002 after 25-point smoothing; the band edge 0.1 is
    # crossed with slope 0.1/tau per step, so jitter ~ 0.02 tau per sigma; several
    # sigma of excursions over the crossing region stay below 8% of tau*ln(10).
    res = decay_time(STEPS, _exp(tau, noise=0.01, seed=seed))
    assert res.status == "ok", res
    assert abs(res.time - tau * LN10) <= 0.08 * tau * LN10


def test_time_is_a_step_value_not_an_index() -> None:
    steps = 1000.0 + 10.0 * np.arange(3000)
    res = decay_time(steps, _exp(1000.0, steps=steps))  # tau = 100 samples
    assert res.status == "ok"
    assert res.time in set(steps.tolist())
    assert abs((res.time - steps[0]) - 1000.0 * LN10) <= 0.02 * 1000.0 * LN10 + 20.0


@pytest.mark.parametrize("rule", RULES)
def test_lag_ratio_of_exponentials_is_three(rule: str) -> None:
    res = lag_ratio(STEPS, _exp(300.0), _exp(100.0), DecayConfig(rule=rule))
    assert res.status == "ok", res
    assert abs(res.ratio - 3.0) <= 0.1 * 3.0
    assert res.t_step.rule == rule and res.t_flip.rule == rule


def test_lag_ratio_uses_durations_from_first_step() -> None:
    steps = 5000.0 + np.arange(3000.0)  # absolute step values would give ratio ~1.1
    res = lag_ratio(steps, _exp(300.0, steps=steps), _exp(100.0, steps=steps))
    assert res.status == "ok"
    assert abs(res.ratio - 3.0) <= 0.3


@pytest.mark.parametrize("k", [100, 700, 1500])
def test_step_function_settles_at_the_step(k: int) -> None:
    x = (STEPS < k).astype(float)
    for rule in ("settle", "threshold"):
        res = decay_time(STEPS, x, DecayConfig(rule=rule))
        assert res.status == "ok"
        assert abs(res.time - k) <= 12  # half the smoothing window
    # cumsum reaches 90% of the mass at 0.9 k by definition
    res = decay_time(STEPS, x, DecayConfig(rule="cumsum"))
    assert abs(res.time - 0.9 * k) <= 2


def test_settle_ignores_offset_but_threshold_does_not() -> None:
    x = _exp(100.0)
    base = decay_times_all_rules(STEPS, x)
    shifted = decay_times_all_rules(STEPS, x + 5.0)
    assert shifted["settle"].time == pytest.approx(base["settle"].time, abs=1.0)
    assert shifted["threshold"].status == "never_settles"


# --------------------------------------------------------- scale invariance


@settings(max_examples=40, deadline=None)
@given(
    scale=st.floats(min_value=1e-6, max_value=1e6),
    tau=st.floats(min_value=20.0, max_value=150.0),
    floor=st.floats(min_value=0.0, max_value=0.2),
    noise=st.floats(min_value=0.0, max_value=0.03),
    seed=st.integers(min_value=0, max_value=2**16),
    rule=st.sampled_from(RULES),
)
def test_positive_scaling_does_not_change_decay_time(
    scale: float, tau: float, floor: float, noise: float, seed: int, rule: str
) -> None:
    steps = np.arange(800.0)
    x = _exp(tau, noise=noise, seed=seed, steps=steps) + floor
    cfg = DecayConfig(rule=rule)
    a, b = decay_time(steps, x, cfg), decay_time(steps, scale * x, cfg)
    assert (a.status, a.time) == (b.status, b.time)


# ---------------------------------------------------------------- edge cases


def test_linear_ramp_never_settles() -> None:
    for sign in (1.0, -1.0):
        res = decay_time(STEPS, sign * STEPS)
        assert res.status == "never_settles" and res.time is None and res.message


def test_growing_oscillation_never_settles() -> None:
    x = (1.0 + 0.5 * np.sin(2 * np.pi * STEPS / 100.0)) * np.exp(STEPS / 500.0)
    for rule in ("settle", "threshold"):
        res = decay_time(STEPS, x, DecayConfig(rule=rule))
        assert res.status == "never_settles" and res.time is None


def test_late_transient_in_final_segment_never_settles() -> None:
    # a short burst at step 2900 (inside the final 10%) barely moves the final
    # level (drift check passes) but leaves the band after the series had settled
    x = _exp(100.0)
    x[2900:2910] += 1.0
    res = decay_time(STEPS, x)
    assert res.status == "never_settles" and "final" in res.message
    x[2900:2910] = 0.0  # the same burst early on is harmless
    x[1000:1010] += 1.0
    assert decay_time(STEPS, x).status == "ok"


def test_threshold_never_reached() -> None:
    res = decay_time(STEPS, 1.0 + 0.5 * _exp(100.0), DecayConfig(rule="threshold"))
    assert res.status == "never_settles" and "never falls below" in res.message


@pytest.mark.parametrize("rule", RULES)
def test_flat_series(rule: str) -> None:
    for level in (0.0, 3.7):
        res = decay_time(STEPS, np.full(3000, level), DecayConfig(rule=rule))
        assert res.status == "flat" and res.time is None


@pytest.mark.parametrize("rule", RULES)
def test_too_short(rule: str) -> None:
    res = decay_time(np.arange(12), _exp(3.0, steps=np.arange(12.0)), DecayConfig(rule=rule))
    assert res.status == "too_short"
    assert "12" in res.message and "min_points=20" in res.message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite(bad: float) -> None:
    x = _exp(100.0)
    x[10] = bad
    for res in decay_times_all_rules(STEPS, x).values():
        assert res.status == "nonfinite" and res.time is None


def test_input_validation() -> None:
    with pytest.raises(ValueError, match=r"3000.*2999"):
        decay_time(STEPS, _exp(100.0)[:-1])
    with pytest.raises(ValueError, match="increasing"):
        decay_time(STEPS[::-1], _exp(100.0))


def test_lag_ratio_names_failing_series() -> None:
    good = _exp(100.0)
    res = lag_ratio(STEPS, good, STEPS.copy())
    assert res.ratio is None and res.status == "flip_rate: never_settles"
    assert res.t_step.status == "ok"
    res = lag_ratio(STEPS, np.full(3000, 2.0), good)
    assert res.ratio is None and res.status == "step_size: flat"
    res = lag_ratio(STEPS, np.full(3000, 2.0), STEPS.copy())
    assert res.status == "step_size: flat; flip_rate: never_settles"


def test_lag_ratio_zero_flip_time_is_undefined() -> None:
    # a near-instant flip decay puts >5% of its mass at the first step -> T_h = steps[0]
    cfg = DecayConfig(rule="cumsum", cumsum_fraction=0.05)
    steps = 7.0 + STEPS
    res = lag_ratio(steps, _exp(100.0, steps=steps), _exp(2.0, steps=steps), cfg)
    assert res.t_flip.status == "ok" and res.t_flip.time == steps[0]
    assert res.status == "undefined" and res.ratio is None
    assert "flip decay time is 0" in res.message


def test_to_dict_is_json_serializable() -> None:
    res = lag_ratio(STEPS, _exp(300.0), _exp(100.0))
    d = json.loads(json.dumps(res.to_dict()))
    assert d["status"] == "ok" and isinstance(d["ratio"], float)
    assert isinstance(d["t_step"]["time"], float)
    bad = json.loads(json.dumps(decay_time(STEPS, STEPS).to_dict()))
    assert bad["time"] is None and bad["status"] == "never_settles"
    assert json.loads(json.dumps(DecayConfig().to_dict()))["window"] == 25


def test_analyze_series_and_all_rules() -> None:
    out = analyze_series(STEPS, {"h": _exp(100.0), "s": _exp(300.0)})
    assert set(out) == {"h", "s"} and all(isinstance(r, DecayResult) for r in out.values())
    assert out["s"].time > 2.5 * out["h"].time
    rules = decay_times_all_rules(STEPS, _exp(100.0), DecayConfig(rule="cumsum", delta=0.2))
    assert list(rules) == list(RULES)
    assert [r.rule for r in rules.values()] == list(RULES)
    # delta is carried over: a wider band settles earlier than the default one
    assert rules["settle"].time < decay_time(STEPS, _exp(100.0)).time


# ----------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"rule": "foo"}, "rule"),
        ({"window": 0}, "window"),
        ({"window": 2.5}, "window"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"final_fraction": 0.6}, "final_fraction"),
        ({"cumsum_fraction": 1.0}, "cumsum_fraction"),
        ({"threshold_fraction": -0.1}, "threshold_fraction"),
        ({"min_points": 1}, "min_points"),
    ],
)
def test_config_validation_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"DecayConfig.{field} "):
        DecayConfig(**kwargs)


def test_config_rule_error_lists_allowed_values() -> None:
    with pytest.raises(ValueError) as err:
        DecayConfig(rule="foo")
    assert "['cumsum', 'settle', 'threshold']" in str(err.value) and "'foo'" in str(err.value)
