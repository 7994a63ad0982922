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
from regime_jax.analysis.timescales import RULES
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


# ------------------------------------------------------------ RunSummary: the one reader


def test_run_summary_round_trips_a_real_runs_summary_byte_for_byte(tmp_path):
    from conftest import tiny_config

    from regime_jax.run import loop

    wd = tmp_path / "run"
    loop.train_and_evaluate(tiny_config(), wd)  # writes summary.json through RunSummary
    text = (wd / summary.SUMMARY).read_text()
    # the writer is today's: summarize_run's dict as strict JSON, indent 1
    assert text == records.to_json(summary.summarize_run(wd), indent=1) + "\n"
    s = summary.RunSummary.load(wd)
    assert s.to_json() == text and list(s.to_dict()) == list(json.loads(text))
    (tmp_path / "again").mkdir()
    assert s.write(tmp_path / "again").read_text() == text
    assert summary.RunSummary.of(json.loads(text)) == s == summary.RunSummary.of(s)
    assert (s.seed, s.num_steps, s.last_step, s.complete, s.partial) == (0, 12, 12, True, None)
    assert s.final_acc == json.loads(text)["final"]["eval/acc"] and s.final_loss is not None
    assert s.freeze_step is None and s.final_disagreement is None and s.window == 25


def _synthetic_summary(tmp_path, **kw) -> dict:
    return summary.summarize_run(write_synthetic_run(tmp_path, n=300, tau_flip=10.0, **kw))


def test_run_summary_reads_every_measure_by_a_named_rule(tmp_path):
    data = _synthetic_summary(tmp_path)
    s = summary.RunSummary.from_json(data)
    assert s.main_rule == "settle" and s.rule() == s.rule(summary.MAIN) == "settle"
    for kind in summary.KINDS:
        for rule in RULES:
            lag = data["lag"][kind][rule]
            got = s.lag(kind, rule)
            assert (got.ratio, got.status, got.message) == (lag["ratio"], lag["status"], "")
            assert s.lag_ratio(kind, rule) == summary.main_ratio(data, kind, rule)
            assert s.t_flip(rule, kind) == summary.Decay.from_json(lag["t_flip"])
            assert s.t_step(rule, kind) == summary.Decay.from_json(lag["t_step"])
            assert s.t_flip(rule, kind).run_fraction == lag["t_flip"]["run_fraction"]
            assert got.budget_bound is (False if lag["ratio"] is not None else None)
    assert s.t_flip() == s.t_flip("settle") == s.t_flip(summary.MAIN_ELSE_FIRST)
    assert s.t_flip().time == data["lag"]["abs"]["settle"]["t_flip"]["time"] is not None
    rel = s.decay_time("step/rel/all", "cumsum")
    assert rel == summary.Decay.from_json(data["decay"]["step/rel/all"]["cumsum"]) and rel.time
    assert s.layer_names == ("fc1", "fc2") and s.layer_lag("fc2").ratio == pytest.approx(1.5, 0.1)
    assert s.lag_ratio_curves == data["lag_ratio_curves"] and s.mva_step == 150
    assert s.online_trigger == data["online"]["time"] is not None
    assert s.notes == () and s.to_dict() == data


def test_main_else_first_falls_back_in_name_order_and_says_why_when_no_rule_has_a_time(tmp_path):
    data = _synthetic_summary(tmp_path)
    for rule, time in (("settle", None), ("cumsum", None), ("fraction", None), ("threshold", 55.0)):
        data["lag"]["abs"][rule]["t_flip"] |= {"time": time}
    data["lag"]["abs"]["settle"]["t_flip"] |= {"status": "never_settles", "message": "why"}
    s = summary.RunSummary.from_json(data)
    assert s.t_flip().time is None and s.t_flip("cumsum").time is None  # main: no fallback
    assert s.t_flip(summary.MAIN_ELSE_FIRST) == s.t_flip("threshold")._replace(rule="threshold")
    assert s.t_flip(summary.MAIN_ELSE_FIRST).time == 55.0
    data["lag"]["abs"]["threshold"]["t_flip"]["time"] = None
    none = summary.RunSummary.from_json(data).t_flip(summary.MAIN_ELSE_FIRST)
    assert none[:4] == (None, "never_settles", "settle", "why")
    data["lag"]["abs"]["threshold"]["t_flip"]["time"] = 55.0  # from_json took a copy
    assert s.t_flip(summary.MAIN_ELSE_FIRST).time == 55.0


def test_the_decoupling_sweep_and_its_report_read_t_flip_through_one_method(tmp_path):
    """Freeze steps (FREEZE_RULE) and the offline column (OFFLINE_RULE) agree wherever the
    main rule gives a T(flip); only the freeze falls back to another rule."""
    from regime_jax.analysis import decoupling

    data = _synthetic_summary(tmp_path)
    s = summary.RunSummary.from_json(data)
    assert s.t_flip(decoupling.FREEZE_RULE) == s.t_flip(decoupling.OFFLINE_RULE) == s.t_flip()
    data["lag"]["abs"]["settle"]["t_flip"]["time"] = None
    s = summary.RunSummary.from_json(data)
    assert s.t_flip(decoupling.OFFLINE_RULE).time is None
    assert s.t_flip(decoupling.FREEZE_RULE).rule == "cumsum"


def test_run_summary_of_a_partial_run_and_of_an_old_summary(tmp_path):
    s = summary.RunSummary.from_json(_synthetic_summary(tmp_path / "p", last_step=50))
    assert s.complete is False and s.last_step == 50
    assert s.partial.startswith("partial at step 50 of 300 (unfinished")
    old = _synthetic_summary(tmp_path / "old")
    for key in ("metrics_sha256", "lag_ratio_curves", "decouple", "online", "partial"):
        old.pop(key)
    old = {"from_the_future": [1]} | old  # an entry no field holds keeps its place
    s = summary.RunSummary.from_json(old)
    assert s.to_dict() == old and list(s.to_dict()) == list(old)
    assert s.to_json() == records.to_json(old, indent=1) + "\n"
    assert s.online_trigger is s.freeze_step is s.metrics_sha256 is s.lag_ratio_curves is None
    assert s.extra == {"from_the_future": [1]}
    bare = summary.RunSummary.from_json({})
    assert bare.to_dict() == {} and bare.t_flip() == summary.Decay(None, None, None, None)
    assert bare.lag().ratio is None and bare.layer_names == () and bare.final_acc is None
    with pytest.raises(TypeError, match="JSON object"):
        summary.RunSummary.from_json([1, 2])


def test_a_run_summary_made_field_by_field_writes_every_entry_in_the_files_order():
    s = summary.RunSummary(seed=3, main_rule="settle", notes=("a",))
    data = s.to_dict()
    assert list(data) == [
        "workdir", "seed", "num_steps", "last_step", "complete", "partial", "metrics_sha256",
        "final", "main_rule", "decay_config", "decay", "lag", "lag_ratio_curves", "layers",
        "reference", "decouple", "notes", "online",
    ]  # fmt: skip
    assert data["seed"] == 3 and data["notes"] == ["a"] and data["lag"] is None
