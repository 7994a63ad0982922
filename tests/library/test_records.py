"""Tests for regime_jax.records' one JSON policy: non-finite numbers are null in every file."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import strict_json, write_synthetic_run

from regime_jax import records
from regime_jax.analysis import summary

NONFINITE = {"nan": math.nan, "inf": math.inf, "neg_inf": -math.inf}


def test_jsonable_turns_numpy_jax_and_nonfinite_values_into_plain_json():
    obj = {
        "f32": np.float32(0.25),
        "i64": np.int64(7),
        "flag": np.bool_(True),
        "jax": jnp.asarray(1.5),
        "vec": np.asarray([1.0, np.nan, np.inf]),
        "tuple": (math.nan, -math.inf, 1),
        3: None,
    }
    assert records.jsonable(obj) == {
        "f32": 0.25,
        "i64": 7,
        "flag": True,
        "jax": 1.5,
        "vec": [1.0, None, None],
        "tuple": [None, None, 1],
        "3": None,
    }
    text = records.to_json(obj)
    assert "NaN" not in text and "Infinity" not in text
    assert strict_json(text)["vec"] == [1.0, None, None]


def test_a_nan_metric_is_null_on_disk_and_nan_in_load_run(tmp_path):
    records.write_config(tmp_path, {"num_steps": 2, "nan_field": math.nan})
    writer = records.MetricsWriter(tmp_path)
    writer.write([{"step": 0, "train/loss": np.float32(2.0), **NONFINITE}])
    writer.write([{"step": 1, "train/loss": jnp.asarray(jnp.nan), "nan": 0.5}])
    writer.close()
    lines = (tmp_path / records.METRICS).read_text().splitlines()
    rows = [strict_json(line) for line in lines]  # strict JSON: no NaN / Infinity tokens
    assert rows[0] == {"step": 0, "train/loss": 2.0, "nan": None, "inf": None, "neg_inf": None}
    assert rows[1] == {"step": 1, "train/loss": None, "nan": 0.5}
    assert strict_json((tmp_path / records.CONFIG).read_text())["nan_field"] is None

    run = records.load_run(tmp_path)
    steps, loss = run.series("train/loss")
    assert steps.tolist() == [0, 1] and loss[0] == 2.0 and np.isnan(loss[1])
    assert all(np.isnan(run.rows[0][k]) for k in NONFINITE)  # JSON keeps no inf: NaN
    assert np.isnan(records.read_rows(tmp_path)[1]["train/loss"])


@pytest.mark.parametrize(("text", "value"), [("nan", math.nan), ("inf", math.inf), ("-inf", -1)])
def test_strings_written_by_older_versions_still_read_as_floats(tmp_path, text, value):
    records.write_config(tmp_path, {"num_steps": 1})
    row = {"step": 0, "flip/all": text, "train/loss": 1.0}
    (tmp_path / records.METRICS).write_text(json.dumps(row) + "\n")
    (got,) = records.load_run(tmp_path).rows
    if math.isnan(value):
        assert math.isnan(got["flip/all"])
    else:
        assert got["flip/all"] == (math.inf if value > 0 else -math.inf)
    assert records.load_run(tmp_path).series("flip/all")[1].dtype == np.float64


def test_summary_of_a_run_with_nan_metrics_is_strict_json(tmp_path):
    d = write_synthetic_run(tmp_path)
    lines = (d / records.METRICS).read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    for row in rows[3:]:
        row["train/loss"] = None  # the loss went non-finite at step 3
    (d / records.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = strict_json(summary.write_run_summary(d).read_text())
    assert written["reference"]["loss_1p1_step"] is None and written["final"]["train/loss"] is None


def test_config_diff_treats_nonfinite_values_as_equal():
    assert records.config_diff({"a": math.nan, "b": (1, 2)}, {"a": math.nan, "b": [1, 2]}) == []
    assert records.config_diff({"a": {"x": 1}}, {"a": {"x": 2}}) == ["a.x"]


def test_a_run_stored_before_the_rename_reads_with_the_new_names(tmp_path):
    (tmp_path / records.CONFIG).write_text(
        json.dumps({"stability": {"probe_size": 8, "num_points": 2}, "num_steps": 1})
    )
    rows = [{"step": 0, "flip/all": 0.1, "probe/kept@1e-06": 1.0, "probe/radius_q50": "inf"}]
    (tmp_path / records.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = records.load_run(tmp_path)
    assert run.config["stability"] == {"num_examples": 8, "num_points": 2}
    assert run.rows == [
        {"step": 0, "flip/all": 0.1, "stability/kept@1e-06": 1.0, "stability/radius_q50": math.inf}
    ]
    assert run.keys("probe/") == []
