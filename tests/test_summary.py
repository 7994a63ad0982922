"""Tests for regime_jax.analysis.summary: run summaries, sweep aggregation, verdicts, figure
data."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from conftest import write_synthetic_run

from regime_jax import records
from regime_jax.analysis import summary
from regime_jax.configs.base import base_config

LN10 = math.log(10.0)


def test_summarize_run_recovers_lag_ratio_three(tmp_path):
    s = summary.summarize_run(write_synthetic_run(tmp_path, tau_flip=20.0, ratio=3.0, n=600))
    assert s["main_rule"] == "settle" and s["complete"] and s["notes"] == []
    for kind in ("abs", "rel"):
        for rule in ("settle", "cumsum", "threshold"):
            lag = s["lag"][kind][rule]
            assert lag["status"] == "ok", lag
            assert lag["ratio"] == pytest.approx(3.0, rel=0.06), (kind, rule)
    t_flip = s["decay"]["flip/all"]["settle"]["time"]
    assert t_flip - 1 == pytest.approx(20.0 * LN10, abs=3)
    assert s["layers"]["fc1"]["abs"]["ratio"] == pytest.approx(3.0, rel=0.06)
    assert s["layers"]["fc2"]["abs"]["ratio"] == pytest.approx(1.5, rel=0.06)
    assert s["layers"]["fc2"]["part"] == "fc2"
    assert s["reference"]["mva_step"] == 300
    # 0.1 + 2 exp(-t/50) <= 1.1 * (0.1 + 2 exp(-12)) first at t = 50 ln(2 / 0.01001) = 264.9
    assert abs(s["reference"]["loss_1p1_step"] - 265) <= 2
    json.dumps(s, allow_nan=False)  # strict JSON


def test_summary_uses_config_timescales_and_falls_back_with_note(tmp_path):
    fields = dict(base_config().timescales.to_dict(), rule="cumsum", window=11)
    s = summary.summarize_run(write_synthetic_run(tmp_path / "a", timescales=fields))
    assert s["main_rule"] == "cumsum" and s["decay_config"]["window"] == 11
    assert summary.main_ratio(s) == s["lag"]["abs"]["cumsum"]["ratio"]
    s = summary.summarize_run(write_synthetic_run(tmp_path / "b", timescales={}))
    assert s["main_rule"] == "settle" and "default DecayConfig" in s["notes"][0]


def test_flat_short_and_nonfinite_series_give_statuses_not_crashes(tmp_path):
    flat = summary.summarize_run(write_synthetic_run(tmp_path / "flat", flip=lambda t: 0.01))
    assert flat["decay"]["flip/all"]["settle"]["status"] == "flat"
    lag = flat["lag"]["abs"]["settle"]
    assert lag["status"] == "flip_rate: flat" and lag["ratio"] is None and lag["message"]
    assert flat["lag"]["abs"]["cumsum"]["status"] == "flip_rate: flat"

    short = summary.summarize_run(write_synthetic_run(tmp_path / "short", n=10))
    for key in summary.SERIES:
        assert short["decay"][key]["settle"]["status"] == "too_short"
    assert (
        short["lag"]["rel"]["threshold"]["status"] == "step_size: too_short; flip_rate: too_short"
    )

    # null: how MetricsWriter stores NaN; "nan": how versions before the JSON policy did
    for stored in (None, "nan"):
        d = write_synthetic_run(tmp_path / f"nan_{stored}")
        lines = (d / records.METRICS).read_text().splitlines()
        row = json.loads(lines[5]) | {"step/abs/all": stored}
        (d / records.METRICS).write_text("\n".join([*lines[:5], json.dumps(row), *lines[6:]]))
        bad = summary.summarize_run(d)
        assert bad["decay"]["step/abs/all"]["settle"]["status"] == "nonfinite"
        assert bad["lag"]["abs"]["settle"]["status"] == "step_size: nonfinite"
        assert bad["lag"]["rel"]["settle"]["status"] == "ok"
        json.dumps(bad, allow_nan=False)


def test_layer_to_part_mapping_and_skip_note(tmp_path):
    d = write_synthetic_run(tmp_path)
    lines = (d / records.METRICS).read_text().splitlines()
    extra = []
    for line in lines:
        row = json.loads(line)
        if "flip/all" in row:
            row |= {"flip/block0/ffn/fc1": row["flip/all"], "flip/conv9": row["flip/all"]}
            row |= {"step/abs/block0": row["step/abs/all"], "step/rel/block0": row["step/rel/all"]}
        extra.append(json.dumps(row))
    (d / records.METRICS).write_text("\n".join(extra) + "\n")
    s = summary.summarize_run(d)
    assert s["layers"]["block0/ffn/fc1"]["part"] == "block0"
    assert s["layers"]["block0/ffn/fc1"]["abs"]["ratio"] == pytest.approx(3.0, rel=0.06)
    assert "conv9" not in s["layers"]
    assert any("conv9" in n and "skipped" in n for n in s["notes"])


def test_write_run_summary_and_flip_raster(tmp_path):
    d = write_synthetic_run(tmp_path)
    path = summary.write_run_summary(d)
    assert path == d / "summary.json" and json.loads(path.read_text())["complete"]
    run = records.load_run(d)
    layer, steps, frac = summary.flip_raster(run, max_units=8)
    assert layer == "fc1" and steps.tolist() == [10, 20] and frac.shape == (8, 2)
    a, b = (np.asarray(run.masks(s)["fc1"].unpack())[:, :8] for s in (0, 10))
    np.testing.assert_allclose(frac[:, 0], (a != b).mean(axis=0))


def test_verdicts():
    stats = lambda mean, lo, hi: {"mean": mean, "ci_low": lo, "ci_high": hi}
    assert summary.verdict(stats(3.5, 3.0, 4.0)).startswith("agrees")
    assert summary.verdict(stats(2.0, 1.5, 2.5)) == "lag > 1 but below paper"
    assert summary.verdict(stats(0.5, 0.4, 0.6)).startswith("disagrees")
    assert summary.verdict(stats(1.1, 0.9, 1.3)).startswith("inconclusive")
    assert summary.verdict(stats(6.0, 5.0, 7.0)).startswith("lag > 1 and above paper")
    assert "one seed" in summary.verdict(stats(0.5, None, None))
    assert summary.verdict(stats(None, None, None)).startswith("no verdict")


def test_summarize_sweep_groups_runs_and_notes_why_one_is_left_out(tmp_path):
    for opt, ratio in (("sgd", 3.0), ("adam", 1.5)):
        for seed in (1, 0):
            d = tmp_path / "alpha" / opt / f"seed_{seed}"
            write_synthetic_run(d, tau_flip=10.0, ratio=ratio, n=300, seed=seed)
    write_synthetic_run(tmp_path / "alpha" / "adam" / "seed_2", n=300, last_step=50)  # died
    sweep = summary.summarize_sweep(tmp_path)
    assert list(sweep.members) == [("alpha", "adam"), ("alpha", "sgd")]  # name order
    assert [d.name for _, d in sweep.members["alpha", "sgd"]] == ["seed_0", "seed_1"]
    assert sorted(sweep.runs) == [f"alpha/{o}/seed_{k}" for o in ("adam", "sgd") for k in (0, 1)]
    assert sweep.notes == [
        "alpha/adam/seed_2: partial at step 50 of 300 (unfinished: killed or interrupted; rerun "
        "its command to resume); left out"
    ]
    stats = sweep.groups["alpha", "sgd"]["lag"]["abs"]["settle"]
    per_seed = [summary.main_ratio(s) for s, _ in sweep.members["alpha", "sgd"]]
    assert stats["n"] == 2 and stats["per_seed"] == per_seed and min(per_seed) > 2
    assert stats["mean"] == pytest.approx(np.mean(per_seed))
    assert (tmp_path / "alpha" / "sgd" / "seed_0" / "summary.json").exists()  # written on the way
    data = sweep.to_dict()
    assert list(data) == ["runs", "groups", "notes"] and list(data["groups"]) == [
        "alpha/adam",
        "alpha/sgd",
    ]
    json.dumps(data, allow_nan=False)
    (row_adam, row_sgd) = summary.table_rows(data)
    assert (row_sgd["setting"], row_sgd["optimizer"], row_sgd["seeds"]) == ("alpha", "sgd", 2)
    assert row_sgd["verdict"] == summary.verdict(stats) and row_adam["paper"] == 3.85


def test_figure_data_seed_means_and_mean_decay_time(tmp_path):
    a = write_synthetic_run(tmp_path / "a", n=100, seed=0)
    shutil.copytree(a, tmp_path / "b")
    runs = [records.load_run(tmp_path / d) for d in ("a", "b")]
    steps, curves = summary.normalized_curves(runs, "flip/all", 5)
    assert curves.shape == (2, steps.size) and curves.min() == 0 and curves.max() == 1
    steps, mean = summary.smoothed_seed_mean(runs, "flip/fc1", 5)
    np.testing.assert_allclose(mean, summary.smoothed_seed_mean(runs[:1], "flip/fc1", 5)[1])
    assert summary.smoothed_seed_mean(runs, "no/such/key", 5)[1] is None
    ok = {"main_rule": "settle", "decay": {"flip/all": {"settle": {"time": 10.0}}}}
    none = {"main_rule": "settle", "decay": {"flip/all": {"settle": {"time": None}}}}
    assert summary.mean_decay_time([ok, none, ok], "flip/all") == 10.0
    assert summary.mean_decay_time([none], "flip/all") is None
