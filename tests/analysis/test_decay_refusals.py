"""Decay times refuse what they cannot measure (issue 24): the decay test, the statuses in
their documented order, the fraction rule at 1/e, run fractions and budget-bound ratios, on
synthetic series with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from regime_jax.analysis.timescales import (
    RULES,
    STATUSES,
    DecayConfig,
    decay_evidence,
    decay_time,
    decay_times_all_rules,
    lag_ratio,
    lag_ratio_curves,
)

STEPS = np.arange(3000.0)


def _noisy(x: np.ndarray, rel_noise: float, seed: int) -> np.ndarray:
    return x + rel_noise * np.random.default_rng(seed).standard_normal(x.size)


# ------------------------------------------------------------ exponentials with noise


@pytest.mark.parametrize("tau", [40.0, 100.0, 250.0, 400.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fraction_rule_at_1_over_e_is_the_time_constant(tau: float, seed: int) -> None:
    # exp(-t / tau) + N(0, 0.01^2): the analytic answer is ceil(tau * ln(1 / f)) = tau at
    # f = 1/e. Smoothed noise 0.01 / 5 on a crossing with slope (1/e) / tau per step moves the
    # crossing by ~0.005 tau per standard deviation: within 5% of tau (plus one step).
    x = _noisy(np.exp(-STEPS / tau), 0.01, seed)
    res = decay_time(STEPS, x, DecayConfig(rule="fraction"))
    assert res.status == "ok", res
    assert abs(res.time - tau) <= 0.05 * tau + 1.0, (res.time, tau)
    assert res.run_fraction == pytest.approx(res.time / 2999.0)
    assert res.relative_drop > 0.95 and res.snr > 50


@pytest.mark.parametrize("f", [0.05, 0.2, 1 / math.e, 0.5])
def test_fraction_rule_family_matches_tau_ln_1_over_f(f: float) -> None:
    tau = 150.0
    res = decay_time(STEPS, np.exp(-STEPS / tau), DecayConfig(rule="fraction", fraction=f))
    assert res.status == "ok" and abs(res.time - math.ceil(tau * math.log(1 / f))) <= 1


def test_every_rule_gives_its_time_on_a_noisy_exponential_with_a_floor() -> None:
    # 1 -> 0.05 floor: it decays by 95% (> min_drop), far above its noise, and is flat at the
    # end: every rule has a time; settle ~ tau ln(1/delta) of the *drop*
    tau = 120.0
    x = _noisy(0.05 + 0.95 * np.exp(-STEPS / tau), 0.01, 3)
    res = decay_times_all_rules(STEPS, x)
    assert all(r.status == "ok" for r in res.values()), res
    assert abs(res["settle"].time - tau * math.log(10)) <= 0.08 * tau * math.log(10)


# ------------------------------------------------------------------ constants + noise


@pytest.mark.parametrize("rel_noise", [0.01, 0.1, 0.3])
def test_constant_plus_noise_has_no_decay_time_under_any_rule(rel_noise: float) -> None:
    # the case: Adam at lr 1e-9, step sizes flat at 1.2e-8 with noise, 1500 steps;
    # before, settle "settled" at step 28 and cumsum at 1352. 100 seeds x every rule.
    steps = np.arange(1500.0)
    for seed in range(100):
        x = 1.2e-8 * _noisy(np.ones(steps.size), rel_noise, seed)
        for rule, res in decay_times_all_rules(steps, x).items():
            assert res.status == "no_decay" and res.time is None, (seed, rule, res)


def test_constant_plus_correlated_noise_has_no_decay_time() -> None:
    # AR(1) noise (phi 0.95, stationary sd 0.1 of the level): slow wanders, still no decay
    steps, phi = np.arange(1500.0), 0.95
    for seed in range(50):
        e = np.random.default_rng(seed).standard_normal(steps.size) * 0.1 * math.sqrt(1 - phi**2)
        ar = np.zeros(steps.size)
        for i in range(1, steps.size):
            ar[i] = phi * ar[i - 1] + e[i]
        for rule, res in decay_times_all_rules(steps, 1.0 + ar).items():
            assert res.status == "no_decay", (seed, rule, res)


def test_a_real_drop_buried_in_noise_is_no_decay_by_its_signal_to_noise() -> None:
    # 1 -> 0.3 over 60 points, per-point noise 2: the relative drop passes, the snr fails
    steps = np.arange(60.0)
    x = _noisy(0.3 + 0.7 * np.exp(-steps / 5.0), 2.0, 0)
    e = decay_evidence(x)
    assert e.snr < DecayConfig().min_snr and not e.decayed
    for res in decay_times_all_rules(steps, x).values():
        assert res.status == "no_decay" and "signal/noise" in res.message


def test_barely_decaying_series_is_no_decay() -> None:
    # SGD at a constant rate on a model that cannot interpolate: 1 -> 0.7 floor (30% drop)
    x = _noisy(0.7 + 0.3 * np.exp(-STEPS / 200.0), 0.01, 0)
    for res in decay_times_all_rules(STEPS, x).values():
        assert res.status == "no_decay" and res.time is None
    # the margin is configurable: at min_drop 0.2 the same series decayed
    assert decay_time(STEPS, x, DecayConfig(min_drop=0.2)).status == "ok"


# ----------------------------------------------------------------------- power laws


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slow_power_law_cut_early_is_still_decaying(seed: int) -> None:
    # (1 + t / 1000)^-1 over 3000 steps: 0.99 -> 0.26, and still falling by ~2.7% of the
    # drop over the last tenth: settle and cumsum (whose times move with the run's end) and
    # a fraction not yet reached say still_decaying
    x = _noisy((1.0 + STEPS / 1000.0) ** -1.0, 0.005, seed)
    res = decay_times_all_rules(STEPS, x)
    for rule in ("settle", "cumsum", "threshold"):
        assert res[rule].status == "still_decaying" and res[rule].time is None, res[rule]
        assert "still decaying" in res[rule].message
    # the fraction rule has crossed 1/e of the start: its time does not move with the end
    start = np.mean(x[:25])
    t_expected = 1000.0 * (math.e / start - 1.0) - 12.0  # counted from the window's center
    assert res["fraction"].status == "ok"
    assert abs(res["fraction"].time - t_expected) <= 0.03 * t_expected


def test_exponential_cut_before_three_time_constants_is_still_decaying() -> None:
    x = np.exp(-STEPS / 1500.0)  # the run is 2 tau long
    assert decay_time(STEPS, x).status == "still_decaying"
    x = np.exp(-STEPS / 600.0)  # 5 tau: settled
    assert decay_time(STEPS, x).status == "ok"


def test_long_power_law_tail_settles_once_the_drift_is_small() -> None:
    # (1 + t)^-2 over 3000 steps: the last 10% moves by << 5% of the drop: settled
    x = (1.0 + STEPS) ** -2.0
    res = decay_times_all_rules(STEPS, x)
    assert all(r.status == "ok" for r in res.values()), res


# ------------------------------------------------------------------- step schedules


def test_step_schedule_times_match_the_drops() -> None:
    # 1 until 1000, 0.2 until 2000, 0.02 after (a step learning-rate schedule's step size)
    x = np.select([STEPS < 1000, STEPS < 2000], [1.0, 0.2], 0.02)
    res = decay_times_all_rules(STEPS, x)
    assert all(r.status == "ok" for r in res.values()), res
    assert abs(res["fraction"].time - 1000) <= 12  # below 1/e of the start at the first drop
    assert abs(res["threshold"].time - 2000) <= 12  # below 0.1 at the second
    # settle: within 0.1 * range (0.098) of the final level 0.02 only from the second drop
    assert abs(res["settle"].time - 2000) <= 12
    # cumsum: 90% of 1000 + 200 + 20 = 1098 -> 1000 + 98 / 0.2
    assert abs(res["cumsum"].time - 1490) <= 13


def test_step_schedule_with_a_small_drop_is_no_decay() -> None:
    x = _noisy(np.where(STEPS < 1500, 1.0, 0.75), 0.02, 0)
    for res in decay_times_all_rules(STEPS, x).values():
        assert res.status == "no_decay"


# --------------------------------------------------- statuses, lag ratios, the budget


def test_statuses_are_checked_in_the_documented_order() -> None:
    assert STATUSES == (
        "nonfinite",
        "too_short",
        "flat",
        "no_decay",
        "still_decaying",
        "never_settles",
        "ok",
    )
    # a series that is short and nonfinite reports nonfinite; short and flat reports too_short
    x = np.full(10, 1.0)
    x[3] = np.nan
    assert decay_time(np.arange(10.0), x).status == "nonfinite"
    assert decay_time(np.arange(10.0), np.ones(10)).status == "too_short"
    assert decay_time(STEPS, np.ones(3000)).status == "flat"


@pytest.mark.parametrize("rule", RULES)
def test_lag_ratio_needs_both_times(rule: str) -> None:
    cfg = DecayConfig(rule=rule)
    flat = _noisy(np.ones(3000), 0.05, 0)
    res = lag_ratio(STEPS, flat, np.exp(-STEPS / 100.0), cfg)
    assert res.ratio is None and res.status == "step_size: no_decay"
    assert res.t_flip.status == "ok" and res.budget_bound is None
    res = lag_ratio(STEPS, np.exp(-STEPS / 300.0), flat, cfg)
    assert res.ratio is None and res.status == "flip_rate: no_decay"
    # the curves hold no ratio for a step size that did not decay, at any parameter value
    for values, ratios in lag_ratio_curves(STEPS, flat, np.exp(-STEPS / 100.0), cfg).values():
        assert values.size and np.isnan(ratios).all()


def test_budget_bound_marks_a_step_time_in_the_last_tenth() -> None:
    # the step size drops at 92% of the run (a late sigmoid); the flip rate early. Settle
    # cannot be budget-bound with the defaults (it refuses a time inside the final 10%:
    # never_settles, or still_decaying here); the fraction family can.
    late = 1.0 / (1.0 + np.exp((STEPS - 2760.0) / 5.0)) + 0.001
    assert lag_ratio(STEPS, late, np.exp(-STEPS / 100.0)).t_step.status == "still_decaying"
    for rule in ("threshold", "fraction"):
        res = lag_ratio(STEPS, late, np.exp(-STEPS / 100.0), DecayConfig(rule=rule))
        assert res.status == "ok" and res.budget_bound is True, res
        assert res.t_step.run_fraction > 0.9 and "budget-bound" in res.message
    res = lag_ratio(STEPS, np.exp(-STEPS / 300.0), np.exp(-STEPS / 100.0))
    assert res.budget_bound is False and res.message == ""
    cfg = DecayConfig(rule="fraction", budget_fraction=0.99)
    assert lag_ratio(STEPS, late, np.exp(-STEPS / 100.0), cfg).budget_bound is False
