"""Tests for regime_jax.analysis.curves and the lag-ratio curves in a run's summary.json."""

from __future__ import annotations

import math

import pytest
from conftest import strict_json, write_synthetic_run

from regime_jax.analysis import curves, summary, timescales


def test_run_summary_curves_match_known_ratio_at_default_parameters(tmp_path):
    d = write_synthetic_run(tmp_path / "run", tau_flip=20.0, ratio=3.0, n=600)
    summary.write_run_summary(d)
    s = strict_json((d / "summary.json").read_text())  # NaN written as null
    got = s["lag_ratio_curves"]
    assert sorted(got) == sorted(timescales.CURVE_GRIDS)
    defaults = {"threshold_fraction": 0.1, "delta": 0.1, "cumsum_fraction": 0.9}
    for param, value in defaults.items():
        curve = got[param]
        assert curve["rule"] == timescales.CURVE_GRIDS[param][0]
        i = curve["values"].index(value)
        # the same measurement as the run's lag ratio under that rule, and the known 3x
        assert curve["ratios"][i] == pytest.approx(s["lag"]["abs"][curve["rule"]]["ratio"])
        assert curve["ratios"][i] == pytest.approx(3.0, rel=0.06)
    assert got["window"]["rule"] == s["main_rule"] == "settle"
    assert all(r == pytest.approx(3.0, rel=0.1) for r in got["window"]["ratios"][:4])


def test_curves_are_null_where_a_rule_cannot_settle(tmp_path):
    flat = write_synthetic_run(tmp_path / "flat", flip=lambda t: 0.01)
    got = strict_json((summary.write_run_summary(flat)).read_text())["lag_ratio_curves"]
    assert all(r is None for c in got.values() for r in c["ratios"])
    # tau_step = 120 on 300 steps: the step size does not fall to 5% of its start (needs
    # ~360 steps) but does fall to 50% (~83 steps)
    d = write_synthetic_run(tmp_path / "slow", tau_flip=20.0, ratio=6.0, n=300)
    got = summary.summarize_run(d)["lag_ratio_curves"]["threshold_fraction"]
    assert got["values"][0] == 0.05 and got["ratios"][0] is None
    assert got["ratios"][-1] == pytest.approx(6.0, rel=0.1)


def test_aggregate_curves_and_paper_ranges():
    def run(ratios):  # a run's lag_ratio_curves
        return {"delta": {"rule": "settle", "values": [0.1, 0.2, 0.3], "ratios": ratios}}

    # a run without curves (None: a summary from before them), a failed measurement
    failed = {"status": "error", "message": "repeated steps"}
    runs = [run([3.8, 2.0, None]), run([3.9, 2.1, None]), run([3.85, 2.2, 5.0]), None, failed]
    agg = curves.aggregate_curves(runs)
    assert list(agg) == ["delta"] and agg["delta"]["n"] == [3, 3, 1]
    assert agg["delta"]["mean"][0] == pytest.approx(3.85)
    assert agg["delta"]["ci_low"][2] is None  # one seed: no CI
    ranges = curves.paper_ranges(agg)
    assert ranges["delta"] == "0.1" and ranges["window"] == "no data"
    values, mean, lo, hi = curves.as_arrays(agg["delta"])
    assert values.tolist() == [0.1, 0.2, 0.3] and hi[0] >= 3.85
    assert math.isnan(lo[2]) and mean[2] == 5.0
    # the geometric mean by default; the arithmetic one on request
    assert agg["delta"]["geo_mean"][1] == pytest.approx((2.0 * 2.1 * 2.2) ** (1 / 3))
    assert agg["delta"]["median"][1] == 2.1
    assert curves.as_arrays(agg["delta"])[1][1] == pytest.approx(agg["delta"]["geo_mean"][1])
    assert curves.as_arrays(agg["delta"], "mean")[1][1] == pytest.approx(2.1)
