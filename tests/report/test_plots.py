"""Tests for regime_jax.report.plots: every figure from a tiny real run, saved to PNG with no
display."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import sys

import jax
import numpy as np
import pytest
from conftest import tiny_config

from regime_jax import models, records, report, stability
from regime_jax.analysis import summary as analysis
from regime_jax.analysis import timescales
from regime_jax.report import plots
from regime_jax.run import loop

PNG = b"\x89PNG\r\n\x1a\n"
TINY = {
    "dataset.num_samples": 1000,  # generated in a fraction of the default 5000's time
    "stability.num_points": 2,
    "stability.num_examples": 8,
    "stability.num_directions": 2,
    "stability.num_radii": 4,
    "stability.radius_batch": None,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """MLP 40-16-12-10, 12 steps, every step recorded and snapshotted; probed at 0, 1, 12."""
    workdir = tmp_path_factory.mktemp("run")
    loop.train_and_evaluate(tiny_config(**TINY), workdir)
    return records.load_run(workdir)


@pytest.fixture(scope="module")
def sweep_dir(run, tmp_path_factory):
    """A two-seed sweep of copies of the tiny run, reported by report.build_report."""
    root = tmp_path_factory.mktemp("sweep")
    for seed in (0, 1):
        shutil.copytree(run.workdir, root / "tiny" / "sgd" / f"seed_{seed}")
    report.build_report(root)
    return root


def _saves(fig, tmp_path, name="fig.png"):
    fig.savefig(tmp_path / name)
    assert (tmp_path / name).read_bytes().startswith(PNG)
    assert fig._repr_png_().startswith(PNG)  # what a notebook displays


def _labels(ax):
    return [line.get_label() for line in ax.get_lines()]


def test_timescales_figure(run, tmp_path):
    summary = analysis.summarize_run(run.workdir)
    fig = plots.timescales_figure(run)
    (ax,) = fig.axes
    mva = summary["reference"]["mva_step"]
    assert mva is not None  # eval at steps 0, 6, 12
    times = [summary["decay"][k][summary["main_rule"]]["time"] for k in analysis.SERIES]
    assert len(ax.get_lines()) == 3 + sum(t is not None for t in times) + 1
    assert [label for label in _labels(ax) if label in analysis.SERIES] == list(analysis.SERIES)
    assert "lag ratio" in ax.get_title()
    _saves(fig, tmp_path)


def test_timescales_figure_marks_given_decay_times_and_ratio(run):
    summary = copy.deepcopy(analysis.summarize_run(run.workdir))
    rule = summary["main_rule"]
    for step, key in enumerate(analysis.SERIES, start=3):
        summary["decay"][key][rule] = {"time": float(step), "status": "ok"}
    summary["lag"]["abs"][rule]["ratio"] = 2.5
    (ax,) = plots.timescales_figure(run, summary).axes
    labels = _labels(ax)
    expected = [f"T {key} = {t}" for t, key in enumerate(analysis.SERIES, start=3)]
    assert [label for label in labels if label.startswith("T ")] == expected
    assert len(labels) == 7  # 3 curves, 3 decay times, MVA
    assert "2.50 (abs)" in ax.get_title()


def test_mask_raster_figure(run, tmp_path):
    fig = plots.mask_raster_figure(run, max_units=8)
    ax, colorbar = fig.axes
    (mesh,) = ax.collections
    assert mesh.get_array().shape == (8, len(run.mask_steps) - 1)
    assert "fc1" in ax.get_ylabel() and colorbar.get_ylabel()
    assert "fc2" in plots.mask_raster_figure(run.workdir, layer="fc2").axes[0].get_ylabel()
    _saves(fig, tmp_path)


def test_sweep_figures_share_the_raster_renderer(sweep_dir, run, tmp_path):
    figures = dict(plots.sweep_figures(analysis.summarize_sweep(sweep_dir)))
    assert list(figures) == ["tiny", "tiny_raster", "lag_curves"]
    panels = figures["lag_curves"].axes
    assert [ax.get_xlabel() for ax in panels] == list(timescales.CURVE_GRIDS)
    assert {"tiny/sgd", "paper 3.85x", "no lag (1x)"} <= set(_labels(panels[0]))
    _saves(figures["lag_curves"], tmp_path)
    top, bottom = figures["tiny"].axes[:2]
    assert "tiny / sgd: 2 seeds" in top.get_title()
    assert {"flip/all (norm.)", "step/abs/all (norm.)"} <= set(_labels(top))
    assert {"flip/fc1", "flip/fc2"} <= set(_labels(bottom))
    ax, _ = figures["tiny_raster"].axes
    assert ax.get_title().startswith("tiny/sgd/seed_0: fc1: per-unit pattern flips")
    (mesh,) = ax.collections  # the same pcolormesh as mask_raster_figure's
    np.testing.assert_array_equal(mesh.get_array(), analysis.flip_raster(run)[2])
    for name, fig in figures.items():
        _saves(fig, tmp_path, f"{name}.png")


def test_mask_raster_figure_without_two_snapshots(run):
    (ax,) = plots.mask_raster_figure(dataclasses.replace(run, mask_steps=[0])).axes
    assert not ax.collections and "snapshots" in ax.texts[0].get_text()


def test_layer_flips_figure(run, tmp_path):
    fig = plots.layer_flips_figure(run)
    (ax,) = fig.axes
    assert _labels(ax) == ["flip/all", "flip/fc1", "flip/fc2"]
    assert ax.get_yscale() == "log"
    _saves(fig, tmp_path)


def test_stability_kept_figure(run, tmp_path):
    probed = [r["step"] for r in run.rows if "stability/kept@1e+00" in r]
    assert probed == [0, 1, 12]
    fig = plots.stability_kept_figure(run)
    ax, _colorbar = fig.axes
    lines = ax.get_lines()
    assert len(lines) == len(probed)
    assert lines[0].get_label() == "init (step 0)" and lines[-1].get_label() == "final (step 12)"
    np.testing.assert_allclose(lines[0].get_xdata(), [1e-6, 1e-4, 1e-2, 1.0])
    assert all(0 <= y <= 1 for line in lines for y in line.get_ydata())
    assert ax.get_xscale() == "log"
    _saves(fig, tmp_path)


def test_stability_figures_without_probe(run):
    bare = dataclasses.replace(
        run, rows=[{k: v for k, v in r.items() if not k.startswith("stability/")} for r in run.rows]
    )
    (ax,) = plots.stability_kept_figure(bare).axes
    assert not ax.get_lines() and "num_points" in ax.texts[0].get_text()
    (ax,) = plots.stability_radius_figure(bare).axes
    assert all(len(line.get_xdata()) == 0 for line in ax.get_lines()[:6])


def test_stability_radius_figure(run, tmp_path):
    fig = plots.stability_radius_figure(run)
    (ax,) = fig.axes
    expected = [f"radius q{q}" for q in (10, 25, 50, 75, 90)]
    assert _labels(ax) == [*expected, "first-order q50", "largest tested radius"]
    for line in ax.get_lines()[:6]:
        assert np.all(np.isfinite(line.get_ydata())) and np.all(line.get_ydata() > 0)
    assert (ax.get_xscale(), ax.get_yscale()) == ("symlog", "log")
    _saves(fig, tmp_path)


def test_kept_vs_eps_figure(tmp_path):
    model = models.create_model({"name": "mlp", "hidden": [8]}, 3)
    x = jax.random.normal(jax.random.key(0), (5, 4))
    params = model.init(jax.random.key(1), x)["params"]
    moved = jax.tree.map(lambda p: 1.5 * p, params)
    config = stability.StabilityConfig(num_directions=2, num_radii=4, radius_batch=None)
    probe = jax.jit(stability.perturb, static_argnames=("preacts_fn", "config"))
    results = {
        name: probe(model, p, x, jax.random.key(2), config)
        for name, p in (("init", params), ("moved", moved))
    }
    fig = plots.kept_vs_eps_figure(results)
    (ax,) = fig.axes
    assert _labels(ax) == ["init", "moved"]
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), config.radii, rtol=1e-6)
    _saves(fig, tmp_path)


def test_table_rows_and_frame(sweep_dir, monkeypatch):
    rows = plots.table_rows(sweep_dir)
    assert rows == plots.table_rows(sweep_dir / "summary.json")
    (row,) = rows
    assert list(row) == [
        "setting",
        "optimizer",
        "rule",
        "seeds",
        "lag mean",
        "CI",
        "median",
        "geo mean",
        "geo CI",
        "budget-bound",
        "paper",
        "verdict",
    ]
    assert row["rule"] == "settle" and plots.table_rows(sweep_dir, "fraction")[0]["rule"] == (
        "fraction"
    )
    assert (row["setting"], row["optimizer"], row["paper"]) == ("tiny", "sgd", 3.85)
    assert row["seeds"] == 0 and row["lag mean"] is None and row["CI"] == "–"  # 12 steps: too short
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    assert plots.table_frame(sweep_dir) == rows


def test_table_frame_is_a_dataframe_where_pandas_is_installed(sweep_dir):
    import pandas as pd  # a test extra, so this path is always exercised in CI

    frame = plots.table_frame(sweep_dir)
    assert isinstance(frame, pd.DataFrame) and list(frame["setting"]) == ["tiny"]


def _with_ratios(summary: dict) -> dict:
    """A sweep summary whose every rule has two seeds with lag ratios 2 and 3."""
    summary = copy.deepcopy(summary)
    for agg in summary["groups"].values():
        for stats in agg["lag"]["abs"].values():
            stats.update(n=2, mean=2.5, ci_low=2.0, ci_high=3.0, per_seed=[2.0, 3.0])
            stats.update(geo_mean=6**0.5, geo_ci_low=2.0, geo_ci_high=3.0, median=2.5)
            stats.update(per_seed_budget_bound=[False, True], budget_bound=1)
    return summary


def test_table_rows_with_ratios(sweep_dir):
    summary = _with_ratios(report.build_report(sweep_dir))
    (row,) = plots.table_rows(summary)
    assert (row["seeds"], row["lag mean"], row["CI"]) == (2, 2.5, "[2.00, 3.00]")
    assert (row["geo mean"], row["geo CI"], row["budget-bound"]) == (6**0.5, "[2.00, 3.00]", 1)
    assert row["verdict"] == "lag > 1 but below paper"


def test_lag_summary_figure(sweep_dir, tmp_path):
    summary = report.build_report(sweep_dir)
    (ax,) = plots.lag_summary_figure(summary).axes
    assert not ax.containers  # no valid ratio: no mean markers
    fig = plots.lag_summary_figure(_with_ratios(summary))
    (ax,) = fig.axes
    assert len(ax.containers) == 4  # one group x four rules
    labels = _labels(ax)
    assert {"settle", "cumsum", "threshold", "fraction", "paper 3.85x"} <= set(labels)
    # the geometric mean is drawn; the budget-bound seed (3.0) hollow, the other filled
    (y,) = {float(c.lines[0].get_ydata()[0]) for c in ax.containers}
    assert y == pytest.approx(6**0.5)
    hollow = [
        ln for ln in ax.get_lines() if ln.get_markerfacecolor() == "none" and len(ln.get_ydata())
    ]
    assert hollow and all(list(ln.get_ydata()) == [3.0] for ln in hollow)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["tiny\nsgd"]
    _saves(fig, tmp_path)


def test_report_cli_writes_one_runs_figures(run, capsys):
    report.main(["--run", str(run.workdir)])
    printed = capsys.readouterr().out.split()
    names = {"timescales", "layer_flips", "raster", "stability_kept", "stability_radius"}
    for name in names:
        path = run.workdir / "figures" / f"{name}.png"
        assert path.stat().st_size > 1000 and str(path) in printed, name
