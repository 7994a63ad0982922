"""Tests for regime_jax.analysis.timescales (smoothing, decay times, lag ratio)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regime_jax.analysis.timescales import (
    RULES,
    DecayConfig,
    DecayResult,
    analyze_series,
    decay_time,
    decay_times_all_rules,
    lag_ratio,
    lag_ratio_curves,
    smooth,
    start_level,
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


# Analytic answers on x_t = exp(-t / tau), t = 0 .. 2999 (module docstring). The smoothed
# interior is S * x_t (S a constant that cancels); the edges are the only approximations.
CONFIGS = [
    DecayConfig(),
    DecayConfig(window=11, delta=0.05, cumsum_fraction=0.8, threshold_fraction=0.3, fraction=0.5),
]


def _analytic(rule: str, tau: float, cfg: DecayConfig, noise: float = 0.0) -> float:
    if rule == "settle":  # |S x_T - L| = delta * R with L ~ 0, R ~ S x_0
        return tau * math.log(1 / cfg.delta)
    if rule in ("threshold", "fraction"):  # start level S x_h at h; S x_k <= f S x_h; T = k - h
        f = cfg.threshold_fraction if rule == "threshold" else cfg.fraction
        return math.ceil(tau * math.log(1 / f))
    if not noise:  # 1 - exp(-T / tau) = cumsum_fraction
        return tau * math.log(1 / (1 - cfg.cumsum_fraction))
    # With noise the rule sums max(y, 0), y ~ N(s, sy^2) with s = exp(-t / tau) and
    # sy = noise / sqrt(w) (w-point average): E max(y, 0) = s Phi(s/sy) + sy phi(s/sy).
    # The tail around zero adds mass and moves T later (documented); apply the rule to it.
    sy = noise / math.sqrt(2 * ((cfg.window - 1) // 2) + 1)
    sig = np.exp(-STEPS / tau)
    u = sig / sy
    cdf = 0.5 * (1 + np.array([math.erf(v / math.sqrt(2)) for v in u]))
    mass = np.cumsum(sig * cdf + sy * np.exp(-(u**2) / 2) / math.sqrt(2 * math.pi))
    return float(np.argmax(mass >= cfg.cumsum_fraction * mass[-1]))


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "w11"])
@pytest.mark.parametrize("tau", [50.0, 77.7, 150.0, 300.0])
def test_every_rule_matches_its_analytic_answer_noise_free(cfg: DecayConfig, tau: float) -> None:
    # Tolerance: threshold exact (1 step for rounding: its level and its crossing are both
    # plain window means, S cancels); settle and cumsum 2% + 2 steps (1 step of
    # discretization, the edge line fit under-reading the convex start, so the range R
    # shrinks by < 1.5% at tau = 50, and S's shift tau * ln(S) ~ h^2 / (6 tau) <= 0.5 steps).
    for rule, res in decay_times_all_rules(STEPS, _exp(tau), cfg).items():
        expected = _analytic(rule, tau, cfg)
        assert res.status == "ok", res
        tol = 1.0 if rule in ("threshold", "fraction") else 0.02 * expected + 2.0
        assert abs(res.time - expected) <= tol, (rule, res.time, expected)


@pytest.mark.parametrize("tau", [3.0, 7.5, 20.0])
@pytest.mark.parametrize("window", [25, 51])
def test_threshold_is_exact_for_decays_faster_than_the_window(tau: float, window: int) -> None:
    # the level is the first window's mean at its center h and the decay is counted from
    # there, so neither an extrapolated edge nor the h points before it enter the time
    res = decay_time(STEPS, _exp(tau), DecayConfig(rule="threshold", window=window))
    assert res.status == "ok" and res.time == math.ceil(tau * LN10)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "w11"])
@pytest.mark.parametrize(("tau", "seed"), [(50.0, 1), (100.0, 2), (300.0, 3), (300.0, 4)])
def test_every_rule_matches_its_analytic_answer_with_noise(
    cfg: DecayConfig, tau: float, seed: int
) -> None:
    # Noise sigma = 0.01 (seeded) -> sigma / sqrt(w) after smoothing; a level f is crossed
    # with slope f / tau per step, so the crossing jitters by ~ (sigma / sqrt(w)) tau / f,
    # a few % of T; tolerance 8% of the analytic answer for every rule (cumsum's answer
    # includes the clipped noise floor; measured worst case 5%).
    x = _exp(tau, noise=0.01, seed=seed)
    for rule, res in decay_times_all_rules(STEPS, x, cfg).items():
        expected = _analytic(rule, tau, cfg, noise=0.01)
        assert res.status == "ok", res
        assert abs(res.time - expected) <= 0.08 * expected, (rule, res.time, expected)


def test_threshold_start_level_is_the_first_window_mean_not_an_extrapolation() -> None:
    # a plateau, then a drop inside the first window: the edge line of smooth() projects
    # y[0] above every observed value; the start level is the window's mean
    x = np.where(STEPS < 8, 1.0, np.exp(-np.maximum(STEPS - 8, 0) / 5.0))
    assert smooth(x, 25)[0] > 1.1 > x[:25].max()
    assert start_level(x, 25) == pytest.approx(np.mean(x[:25]))
    res = decay_time(STEPS, x, DecayConfig(rule="threshold"))
    y = smooth(x, 25)
    k = int(res.time) + 12  # counted from the first window's center, h = 12
    assert y[k] <= 0.1 * start_level(x, 25) < y[k - 1]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    window=st.integers(1, 60),
    n=st.integers(2, 300),
    shape=st.sampled_from(["noise", "plateau_drop", "spike", "exp"]),
)
def test_start_level_never_leaves_the_first_window(seed, window, n, shape) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=float)
    x = {
        "noise": rng.standard_normal(n),
        "plateau_drop": np.where(t < rng.integers(1, 30), 1.0, 0.01),
        "spike": np.where(t == rng.integers(0, 10), 10.0, rng.uniform(0, 1, n)),
        "exp": np.exp(-t / rng.uniform(1, 100)) + 0.05 * rng.standard_normal(n),
    }[shape]
    w = 2 * ((min(window, n) - 1) // 2) + 1
    level = start_level(x, window)
    assert x[:w].min() - 1e-12 <= level <= x[:w].max() + 1e-12
    if n >= 20 and level > 0:
        res = decay_time(t, x, DecayConfig(rule="threshold", window=window))
        assert res.status != "ok" or res.time > t[0]  # k > h: never a zero duration
    with pytest.raises(ValueError, match="non-empty"):
        start_level(np.array([]), window)


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


def test_lag_ratio_curves_match_the_analytic_ratios() -> None:
    curves = lag_ratio_curves(STEPS, _exp(300.0), _exp(100.0))
    assert list(curves) == ["threshold_fraction", "delta", "cumsum_fraction", "window"]
    for param, lo, hi in [
        ("threshold_fraction", 0.05, 0.5),
        ("delta", 0.02, 0.2),
        ("cumsum_fraction", 0.5, 0.95),
        ("window", 10, 200),
    ]:
        values, ratios = curves[param]
        assert values.shape == ratios.shape and values[0] == lo and values[-1] == hi
        assert np.all(np.isfinite(ratios))
    # threshold: ceil(300 ln 1/f) / ceil(100 ln 1/f), both times exact (to a step)
    values, ratios = curves["threshold_fraction"]
    cfg = DecayConfig(rule="threshold")
    expected = [
        _analytic("threshold", 300.0, dataclasses.replace(cfg, threshold_fraction=f))
        / _analytic("threshold", 100.0, dataclasses.replace(cfg, threshold_fraction=f))
        for f in values
    ]
    np.testing.assert_allclose(ratios, expected, rtol=0.01)
    # settle and cumsum: each time within 2% + 2 steps of tau * const, so the ratio is 3 +- 3%
    for param in ("delta", "cumsum_fraction"):
        np.testing.assert_allclose(curves[param][1], 3.0, rtol=0.03)
    # window (settle rule): 3 for small windows; wider ones shift the faster series' time
    # more (the smoothing shift ~ h^2 / (6 tau)), down to 2.67 at w = 199: within 12%
    values, ratios = curves["window"]
    np.testing.assert_allclose(ratios[values <= 26], 3.0, rtol=0.01)
    np.testing.assert_allclose(ratios, 3.0, rtol=0.12)
    assert ratios[-1] < ratios[0]


def test_lag_ratio_curves_grids_and_failures() -> None:
    cfg = DecayConfig(rule="threshold")
    got = lag_ratio_curves(STEPS, _exp(300.0), _exp(100.0), cfg, grids={"window": [10, 51]})
    (values, ratios) = got["window"]
    assert list(got) == ["window"] and values.tolist() == [10.0, 51.0]
    # the window sweep uses config.rule: threshold, whose times do not depend on the window
    np.testing.assert_allclose(ratios, 691 / 231, rtol=1e-9)
    flat = lag_ratio_curves(STEPS, np.full(3000, 2.0), _exp(100.0), grids={"delta": [0.1, 0.2]})
    assert np.isnan(flat["delta"][1]).all()  # step size flat: no ratio, NaN
    with pytest.raises(ValueError, match="no lag-ratio curve for 'final_fraction'"):
        lag_ratio_curves(STEPS, _exp(300.0), _exp(100.0), grids={"final_fraction": [0.1]})


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
    x, cfg = _exp(100.0), DecayConfig(min_drop=0.0)  # the decay test's relative drop off
    base = decay_times_all_rules(STEPS, x, cfg)
    shifted = decay_times_all_rules(STEPS, x + 5.0, cfg)
    assert shifted["settle"].time == pytest.approx(base["settle"].time, abs=1.0)
    assert shifted["threshold"].status == "never_settles"
    # with the default min_drop 0.5, 5.9 -> 5.0 is not a decay under any rule
    for res in decay_times_all_rules(STEPS, x + 5.0).values():
        assert res.status == "no_decay" and res.time is None and "relative drop" in res.message


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


def test_rising_and_negative_ramps_do_not_decay() -> None:
    for x in (STEPS, -STEPS):
        for res in decay_times_all_rules(STEPS, x).values():
            assert res.status == "no_decay" and res.time is None and res.message


def test_falling_ramp_is_still_decaying() -> None:
    # 3000 -> 0 in a straight line: it decayed, but is still falling at the end; settle and
    # cumsum would read the run's end, the fraction family crosses f * I on the way down
    res = decay_times_all_rules(STEPS, 3000.0 - STEPS)
    assert res["settle"].status == res["cumsum"].status == "still_decaying"
    assert res["fraction"].status == "ok"
    assert res["fraction"].time == pytest.approx((3000 - 12) * (1 - math.exp(-1)), abs=2)


def test_growing_oscillation_does_not_decay() -> None:
    x = (1.0 + 0.5 * np.sin(2 * np.pi * STEPS / 100.0)) * np.exp(STEPS / 500.0)
    for res in decay_times_all_rules(STEPS, x).values():
        assert res.status == "no_decay" and res.time is None


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
    # decays (0.93 -> 0.4, levels off) but never below 0.1 x start
    x = 0.4 + 0.6 * _exp(100.0)
    res = decay_time(STEPS, x, DecayConfig(rule="threshold"))
    assert res.status == "never_settles" and "never falls below" in res.message
    assert decay_time(STEPS, x, DecayConfig(rule="settle")).status == "ok"


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
    assert res.ratio is None and res.status == "flip_rate: no_decay"
    assert res.t_step.status == "ok" and res.budget_bound is None
    res = lag_ratio(STEPS, np.full(3000, 2.0), good)
    assert res.ratio is None and res.status == "step_size: flat"
    res = lag_ratio(STEPS, np.full(3000, 2.0), STEPS.copy())
    assert res.status == "step_size: flat; flip_rate: no_decay"


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
    assert bad["time"] is None and bad["status"] == "no_decay" and bad["run_fraction"] is None
    assert d["t_step"]["run_fraction"] == pytest.approx(d["t_step"]["time"] / 2999)
    assert d["budget_bound"] is False
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
        ({"fraction": 1.0}, "fraction"),
        ({"min_drop": -0.1}, "min_drop"),
        ({"min_drop": 1.0}, "min_drop"),
        ({"min_snr": -1.0}, "min_snr"),
        ({"min_snr": math.nan}, "min_snr"),
        ({"max_final_drift": 0.0}, "max_final_drift"),
        ({"budget_fraction": 1.5}, "budget_fraction"),
        ({"budget_fraction": True}, "budget_fraction"),
    ],
)
def test_config_validation_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"DecayConfig.{field} "):
        DecayConfig(**kwargs)


def test_config_rule_error_lists_allowed_values() -> None:
    with pytest.raises(ValueError) as err:
        DecayConfig(rule="foo")
    assert "['cumsum', 'fraction', 'settle', 'threshold']" in str(err.value)
    assert "'foo'" in str(err.value)
