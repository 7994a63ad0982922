"""The sweep layout (regime_jax.analysis.layout) and the report's number formatter
(regime_jax.analysis.fmt)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from regime_jax import records
from regime_jax.analysis import fmt, layout
from regime_jax.analysis.seeds import seed_stats

# ------------------------------------------------------------------------------ the layout


def test_path_name_and_parse_spell_one_layout(tmp_path):
    run = layout.path(tmp_path, "mlp_mnist1d@0.5T", "adam", 4)
    assert run == tmp_path / "mlp_mnist1d@0.5T" / "adam" / "seed_4"
    assert layout.name("mlp_mnist1d@0.5T", "adam", 4) == "mlp_mnist1d@0.5T/adam/seed_4"
    assert layout.parse(run) == ("mlp_mnist1d@0.5T", "adam", 4)
    for not_a_run in ("seed_", "seed_x", "seed_-1", "4", "sd_4"):
        assert layout.parse(tmp_path / "s" / "o" / not_a_run) is None


def test_find_runs_finds_every_run_with_a_config_and_nothing_else(tmp_path):
    made = [("b", "sgd", 1), ("a", "sgd", 10), ("a", "sgd", 2), ("a", "adam", 0)]
    for key in made:
        layout.path(tmp_path, *key).mkdir(parents=True)
        records.write_config(layout.path(tmp_path, *key), {"seed": key[2]})
    (tmp_path / "a" / "sgd" / "seed_3").mkdir()  # not started: no config.json
    for odd in ("a/sgd/seed_x", "a/sgd/other", "a/seed_5", "x/y/z/seed_6"):
        (tmp_path / odd).mkdir(parents=True)
        records.write_config(tmp_path / odd, {})
    found = layout.find_runs(tmp_path)
    assert [f[:3] for f in found] == sorted(made)
    assert all(layout.path(tmp_path, *f[:3]) == f[3] for f in found)
    assert layout.find_runs(tmp_path / "nothing_here") == []


def test_the_sweep_the_summary_and_the_report_share_the_layout():
    from regime_jax import report, sweep
    from regime_jax.analysis import summary

    assert summary.find_runs is layout.find_runs is report.find_runs
    spec = sweep.RunSpec("s", "o", 2, None)
    assert spec.path == layout.name("s", "o", 2)
    assert spec.rundir("w") == layout.path("w", "s", "o", 2)


# ---------------------------------------------------------------------------- the formatter


def _old_fmt_ci(stats):  # report/__init__.py's _fmt_ci before the one formatter
    lo, hi = stats["ci_low"], stats["ci_high"]
    mean = "–" if stats["mean"] is None else f"{stats['mean']:.2f}"
    return mean + ("" if lo is None or hi is None else f" [{lo:.2f}, {hi:.2f}]")


def _old_ci(stats, spec=".3f", signed=False):  # report/__init__.py's _ci before it
    if not stats or stats.get("mean") is None or not np.isfinite(stats["mean"]):
        return "–"
    f = ("+" if signed else "") + spec
    text = format(stats["mean"], f)
    lo, hi = stats.get("ci_low"), stats.get("ci_high")
    if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
        text += f" [{lo:{f}}, {hi:{f}}]"
    return text


def test_num_interval_and_ci():
    assert fmt.num(None) == fmt.DASH == "–"
    assert [fmt.num(x, s) for x, s in ((1.005, ".2f"), (169.5, ".0f"), (0.05, "g"))] == [
        "1.00",
        "170",
        "0.05",
    ]
    assert fmt.interval(0.5, 2.0) == "[0.50, 2.00]"
    assert fmt.interval(None, 2.0) == fmt.interval(0.5, math.nan) == "–"
    assert fmt.ci({"mean": 0.25, "ci_low": -0.5, "ci_high": 1.0}, ".1f", signed=True) == (
        "+0.2 [-0.5, +1.0]"
    )
    assert fmt.ci({"mean": math.inf, "ci_low": 1, "ci_high": 2}) == "–"
    assert fmt.ci({"mean": 1.0, "ci_low": math.nan, "ci_high": 2.0}) == "1.00"
    assert fmt.ci({}) == fmt.ci(None) == "–"


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_ci_writes_what_the_two_old_formatters_wrote_on_seed_statistics(n):
    """Seed statistics as a summary holds them (JSON: NaN as None): the report's text is the
    same, to the byte, as before the one formatter."""
    rng = np.random.default_rng(n)
    for values in ([*rng.normal(1, 2, n)], [*rng.normal(1, 2, n), None], [None] * n):
        stats = records.jsonable(seed_stats(values).to_dict())
        assert fmt.ci(stats) == _old_fmt_ci(stats)
        for spec, signed in ((".3f", False), (".3f", True), (".0f", False), (".2f", False)):
            assert fmt.ci(stats, spec, signed) == _old_ci(stats, spec, signed)
        lo, hi = stats["ci_low"], stats["ci_high"]
        assert fmt.interval(lo, hi) == ("–" if lo is None else f"[{lo:.2f}, {hi:.2f}]")
