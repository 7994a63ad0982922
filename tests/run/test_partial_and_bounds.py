"""Issue 21, bullets 3-5: partial runs are said, inputs that are not numbers and values the
machine cannot honour are refused before any work.

* A run that is not finished (killed mid-way, live, stopped by a non-finite loss) is read and
  marked "partial at step N of M" everywhere (load_run, summaries, figure titles, report
  output); a sweep report leaves it out and says so; a stale summary.json is not trusted.
* NaN / inf in a dataset split is refused at load, naming the split and the first bad index
  (library and CLI: exit 2, one line, nothing written).
* Every numeric config field has an upper bound: a huge or negative value is one line naming
  the field and the allowed range, exit 2, nothing written; a sweep whose run paths do not
  fit the file system is refused before sweep.json is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from conftest import tiny_config

from regime_jax import data, main, records, registry, report, sweep
from regime_jax.analysis import summary
from regime_jax.configs.base import ConfigError, validate_config
from regime_jax.report import plots
from regime_jax.run import cli, loop, rundir

ROOT = Path(__file__).parents[2]
CKPT = {"num_steps": 12, "checkpoint.every_steps": 4}
EVAL10 = "--config.eval_every_steps=10"


pytestmark = pytest.mark.usefixtures("keep_signal_handlers")  # main.run installs its own


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 12-step run (every step recorded and snapshotted), with its summary.json."""
    workdir = tmp_path_factory.mktemp("finished")
    loop.train_and_evaluate(tiny_config(**CKPT), workdir)
    return workdir


def _cut(src: Path, dst: Path, step: int, *, nonfinite: bool = False, keep_summary=False):
    """A copy of ``src`` as a run killed after ``step`` (rows and snapshots after it gone);
    ``nonfinite``: its last row holds a null loss, as a run stopped by NaN leaves it."""
    shutil.copytree(src, dst)
    if not keep_summary:
        (dst / records.SUMMARY).unlink()
    rows = [json.loads(line) for line in (dst / records.METRICS).read_text().splitlines()]
    kept = [r for r in rows if r["step"] <= step]
    if nonfinite:
        kept[-1]["train/loss"] = None
    (dst / records.METRICS).write_text("".join(json.dumps(r) + "\n" for r in kept))
    for snap in (dst / records.MASKS_DIR).glob("step_*.npz"):
        if int(snap.stem.removeprefix("step_")) > step:
            snap.unlink()
    return dst


# ------------------------------------------------------------------ partial is said


WHY = {
    "killed": "(unfinished: killed or interrupted",
    "nonfinite": "(stopped by a non-finite train/loss at step 6)",
    "live": f"(live: process {os.getpid()} holds",
}


@pytest.mark.parametrize("kind", sorted(WHY))
def test_an_unfinished_live_or_nan_stopped_run_is_marked_partial_everywhere(
    kind, finished, tmp_path
):
    d = _cut(finished, tmp_path / kind, 6, nonfinite=kind == "nonfinite")
    with rundir.lock(d) if kind == "live" else contextlib.nullcontext():
        run = records.load_run(d)
        assert run.partial.startswith("partial at step 6 of 12 ") and WHY[kind] in run.partial
        s = summary.summarize_run(d)
        assert s["partial"] == run.partial and s["complete"] is False
        figures = dict(plots.run_figures(run))
        assert sorted(figures) == ["layer_flips", "raster", "timescales"]
        for name, fig in figures.items():
            assert fig.get_suptitle() == run.partial, name
        # a figure made from the workdir path is marked too
        assert plots.timescales_figure(d).get_suptitle() == run.partial


def test_a_finished_run_is_not_marked(finished):
    run = records.load_run(finished)
    assert run.partial is None and summary.summarize_run(finished)["partial"] is None
    assert all(fig.get_suptitle() == "" for _, fig in plots.run_figures(run))


def test_report_run_on_a_killed_run_prints_and_titles_partial(finished, tmp_path, capsys):
    d = _cut(finished, tmp_path / "killed", 8)
    report.main(["--run", str(d)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{d}: partial at step 8 of 12 (unfinished")
    figures = [line for line in out[1:] if line.endswith(".png")]
    assert sorted(Path(p).name for p in figures) == [
        "layer_flips.png",
        "raster.png",
        "timescales.png",
    ]
    # The readings between say why there is no ratio (8 steps are too short), never a number.
    readings = [line for line in out[1:] if not line.endswith(".png")]
    assert readings and all(line.startswith("lag ratio [") for line in readings), readings
    assert all(": none (" in line and "too_short" in line for line in readings), readings
    assert not (d / records.SUMMARY).exists()  # a partial run never gets a summary.json


def test_a_torn_last_line_of_a_live_run_is_dropped_by_load_run(finished, tmp_path):
    d = _cut(finished, tmp_path / "torn", 5)
    with open(d / records.METRICS, "a") as f:
        f.write('{"step": 6, "train/lo')  # the writer is mid-line
    run = records.load_run(d)
    assert run.last_step == 5 and run.partial.startswith("partial at step 5 of 12")


def _sweep_dir(finished: Path, root: Path) -> Path:
    run = root / "s" / "sgd" / "seed_0"
    shutil.copytree(finished, run)
    return run


def test_sweep_report_leaves_a_partial_run_out_and_says_so(finished, tmp_path, capsys):
    run = _cut(finished, tmp_path / "s" / "sgd" / "seed_0", 6)
    report.main(["--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.startswith("Partial: 1 of 1 runs are not in this report")
    md = (tmp_path / "report.md").read_text()
    assert "**Partial: 1 of 1 runs are not in this report" in md
    assert "s/sgd/seed_0: partial at step 6 of 12 (unfinished" in md
    written = json.loads((tmp_path / records.SUMMARY).read_text())
    assert written["runs"] == {} and written["partial"].startswith("Partial: 1 of 1")
    assert not (run / records.SUMMARY).exists()


def test_a_stale_summary_of_a_cut_run_is_not_trusted(finished, tmp_path):
    run = _sweep_dir(finished, tmp_path)
    assert list(summary.summarize_sweep(tmp_path).runs) == ["s/sgd/seed_0"]  # fresh: used
    _cut(finished, tmp_path / "cut", 6)
    shutil.copy(tmp_path / "cut" / records.METRICS, run / records.METRICS)  # cut after
    sweep_ = summary.summarize_sweep(tmp_path)
    assert sweep_.runs == {}
    (note,) = sweep_.notes
    assert note.startswith("s/sgd/seed_0: partial at step 6 of 12 (unfinished")
    assert "summary.json is stale" in note and note.endswith("left out")


def test_a_stale_summary_of_a_changed_complete_run_is_recomputed(finished, tmp_path):
    run = _sweep_dir(finished, tmp_path)
    lines = (run / records.METRICS).read_text().splitlines()
    row = json.loads(lines[3]) | {"flip/all": 0.5}  # a value edited after the summary
    (run / records.METRICS).write_text("\n".join([*lines[:3], json.dumps(row), *lines[4:]]) + "\n")
    sweep_ = summary.summarize_sweep(tmp_path)
    assert sweep_.notes[0] == (
        "s/sgd/seed_0: its summary.json is stale (metrics.jsonl changed after it was written); "
        "recomputed"
    )
    written = json.loads((run / records.SUMMARY).read_text())
    assert written["metrics_sha256"] == records.metrics_digest(run)
    fresh = summary.RunSummary.from_json(written)
    assert summary.load_or_summarize(run) == (fresh, "")  # fresh again: no note


def test_an_unreadable_summary_is_recomputed(finished, tmp_path):
    run = _sweep_dir(finished, tmp_path)
    (run / records.SUMMARY).write_text('{"lag": ')
    got, why = summary.load_or_summarize(run)
    assert why == "its summary.json is unreadable; recomputed"
    assert got.metrics_sha256 == records.metrics_digest(run) and got.complete is True


def test_a_summary_without_a_digest_is_checked_against_the_rows(finished, tmp_path):
    run = _sweep_dir(finished, tmp_path)
    old = json.loads((run / records.SUMMARY).read_text())
    old.pop("metrics_sha256")  # as summaries before the digest were written
    (run / records.SUMMARY).write_text(json.dumps(old))
    got, why = summary.load_or_summarize(run)
    assert (got.to_dict(), why) == (old, "") and got.metrics_sha256 is None
    assert list(got.to_dict()) == list(old)  # an old summary's entries, as they were
    _cut(finished, tmp_path / "cut", 6)
    shutil.copy(tmp_path / "cut" / records.METRICS, run / records.METRICS)
    got, why = summary.load_or_summarize(run)
    assert got is None and "partial at step 6 of 12" in why and "stale" in why


@pytest.mark.heavy
def test_report_on_a_live_then_killed_cli_run_is_marked(tmp_path, capsys):
    """A real run in another process: live while it writes, unfinished once kill -9'd."""
    cmd = [
        sys.executable,
        "-m",
        "regime_jax.main",
        "--config=mlp_mnist1d:quick",
        f"--workdir={tmp_path}",
        "--config.num_steps=3000",
        "--config.model.hidden=(16,12)",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, deadline = tmp_path / records.METRICS, time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) > 300:
            break
        time.sleep(0.01)
    live = records.load_run(tmp_path).partial
    proc.kill()
    proc.wait()
    assert f"(live: process {proc.pid} holds" in live and live.endswith("is still writing)")
    report.main(["--run", str(tmp_path)])
    first = capsys.readouterr().out.splitlines()[0]
    assert " of 3000 (unfinished: killed or interrupted" in first


# ------------------------------------------------------------------ inputs that are not numbers


def _arrays(n_train=40, n_val=20):
    rng = np.random.default_rng(0)
    x_train, x_val = rng.normal(size=(n_train, 10)), rng.normal(size=(n_val, 10))
    y_train, y_val = rng.integers(0, 3, n_train), rng.integers(0, 3, n_val)
    return {
        "x_train": x_train.astype(np.float32),
        "y_train": y_train.astype(np.int32),
        "x_val": x_val.astype(np.float32),
        "y_val": y_val.astype(np.int32),
    }


@pytest.mark.parametrize(
    ("field", "index", "value", "split"),
    [
        ("x_train", 13, np.nan, "train inputs"),
        ("x_train", 0, -np.inf, "train inputs"),
        ("x_val", 7, np.nan, "validation inputs (the probe set is drawn from them)"),
        ("x_val", 19, np.inf, "validation inputs"),
        ("y_train", 3, np.nan, "train labels"),  # float labels (a user's loss) too
    ],
)
def test_a_dataset_with_nan_or_inf_is_refused_naming_split_and_index(
    field, index, value, split, tmp_path
):
    arrays = _arrays()
    if field.startswith("y"):
        arrays[field] = arrays[field].astype(np.float32)
    arrays[field][index, ...] = value  # the whole example (a row of x, one label)
    if field.startswith("x"):
        arrays[field][index + 1 :, 0] = np.nan  # later bad examples are not the first
    with pytest.raises(ValueError) as err:
        data.Dataset("blobs", num_classes=3, **arrays)
    line = str(err.value)
    assert "\n" not in line and f"dataset 'blobs': {split}" in line
    assert f"at index {index} ({field}[{index}])" in line


def test_train_and_evaluate_with_a_nan_dataset_writes_nothing(tmp_path):
    arrays = _arrays()
    arrays["x_val"][5, 2] = np.nan
    with pytest.raises(ValueError, match=r"validation inputs .* at index 5"):
        loop.train_and_evaluate(
            tiny_config(), tmp_path / "w", dataset=data.Dataset("blobs", num_classes=3, **arrays)
        )
    assert not (tmp_path / "w").exists()


def test_the_cli_refuses_a_nan_dataset_in_one_line_before_any_write(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(registry.DATASETS, "_factories", dict(registry.DATASETS._factories))
    config_file = tmp_path / "nan_data.py"
    config_file.write_text(
        "import numpy as np\n"
        "from regime_jax import data\n"
        "from regime_jax.configs.base import base_config\n\n"
        "def load(cfg):\n"
        "    x = np.ones((100, 40), np.float32)\n"
        "    xv = np.ones((50, 40), np.float32)\n"
        "    xv[31, 4] = np.inf\n"
        "    y = np.zeros(100, np.int32)\n"
        "    return data.Dataset('pb_nan', x, y, xv, y[:50], 10)\n\n"
        "data.register_dataset('pb_nan', load)\n\n"
        "def get_config(arg=None):\n"
        "    c = base_config()\n"
        "    c.dataset.name, c.probe.size, c.batch_size = 'pb_nan', 16, 8\n"
        "    return c\n"
    )
    workdir = tmp_path / "w"
    code = main.run(["regime_jax", f"--config={config_file}", f"--workdir={workdir}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("regime_jax: error: dataset 'pb_nan': validation inputs")
    assert "hold inf at index 31 (x_val[31])" in line
    assert not workdir.exists()


# ------------------------------------------------------------------ bounds before work


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--config.num_steps=99999999999999999999"], "num_steps"),
        (["--config.num_steps=1e14"], "num_steps"),
        (["--config.num_steps=-5"], "num_steps"),
        (["--config.batch_size=1e12"], "batch_size"),
        (["--config.probe.size=99999999999"], "probe.size"),
        (["--config.eval_batch_size=-1"], "eval_batch_size"),
        (["--config.steps_per_call=1e6"], "steps_per_call"),
        (["--config.seed=1e10"], "seed"),
        (["--config.dataset.num_samples=1e9"], "dataset.num_samples"),
        (["--config.checkpoint.every_steps=-1"], "checkpoint.every_steps"),
        (["--config.checkpoint.keep=1e12"], "checkpoint.keep"),
        (["--config.stability.num_points=1e7"], "stability.num_points"),
        (["--config.stability.num_directions=1e6"], "stability.num_directions"),
        (["--config.stability.max_radius=1e39"], "stability.max_radius"),
        (["--config.optimizer.learning_rate=1e39"], "optimizer.learning_rate"),
        (["--config.decouple.freeze_step=1e10"], "decouple.freeze_step"),
        (["--config.decouple.check_every_steps=1e12"], "decouple.check_every_steps"),
        (["--config.timescales.window=1e9"], "timescales.window"),
        (["--config.decouple.online.patience=1e9"], "decouple.online.patience"),
        (["--config.parallel.devices=1e6"], "parallel.devices"),
        (["--config.num_steps=100000000", "--config.record.every_steps=1"], "record.every_steps"),
        (
            ["--config.num_steps=100000000", "--config.record.every_steps=1000", EVAL10],
            "eval_every_steps",
        ),
    ],
)
def test_a_value_out_of_range_is_one_line_naming_field_and_range(flags, field, tmp_path, capsys):
    workdir = tmp_path / "w"
    code = main.run(["regime_jax", "--config=mlp_mnist1d:quick", f"--workdir={workdir}", *flags])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"regime_jax: error: {field}=")
    assert "allowed" in line or " in 0..4294967295" in line  # the range, or the seeds' one
    assert not workdir.exists()  # nothing written, config.json included


def test_bounds_hold_for_a_config_made_in_python():
    c = tiny_config()
    c.num_steps = 10**20
    with pytest.raises(ConfigError, match=r"num_steps=10{20}; allowed values: an int >= 1 and"):
        validate_config(c)


def test_an_int_field_takes_integral_exponent_notation_but_not_fractions(tmp_path, capsys):
    config = cli.load_with_overrides("mlp_mnist1d:quick", [("num_steps", "2.5e2")])
    assert config.num_steps == 250 and type(config.num_steps) is int
    args = ["--config=mlp_mnist1d:quick", f"--workdir={tmp_path}/w", "--config.num_steps=2.55e1"]
    code = main.run(["regime_jax", *args])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--config.num_steps=2.55e1: expected an int" in line
    assert not (tmp_path / "w").exists()


def _grid(name: str, seeds=(0,)) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.settings = [{"name": name, "experiment": "mlp_mnist1d", "arg": "quick", "overrides": {}}]
    c.optimizers = {"sgd": {"name": "sgd", "learning_rate": 0.05}}
    c.seeds = list(seeds)
    c.overrides = {}
    return c


def test_a_too_long_setting_name_is_refused_before_sweep_json(tmp_path):
    with pytest.raises(ConfigError, match=r"setting name 'aaaa.*' is 300 bytes, longer than"):
        sweep.run_sweep(_grid("a" * 300), tmp_path / "sw", log=lambda _: None)
    assert not (tmp_path / "sw").exists()


def test_a_too_deep_sweep_is_refused_before_sweep_json(tmp_path):
    deep = tmp_path.joinpath(*["d" * 200] * 20)  # each name fits, the path does not
    with pytest.raises(ConfigError, match=r"is too deep: .* limit of \d+ bytes"):
        sweep.run_sweep(_grid("b" * 200), deep, log=lambda _: None)
    assert not any(tmp_path.iterdir())


def test_a_grid_too_large_is_refused_before_composing_it(tmp_path):
    with pytest.raises(ConfigError, match=r"the grid has 10001 runs .* at most 10000"):
        sweep.run_sweep(_grid("c", seeds=range(10001)), tmp_path / "sw", log=lambda _: None)
    assert not (tmp_path / "sw").exists()


def test_the_sweep_cli_refuses_a_too_long_setting_name_in_one_line(tmp_path):
    config_file = tmp_path / "long.py"
    config_file.write_text(
        "import ml_collections\n\n"
        "def get_config(arg=None):\n"
        "    c = ml_collections.ConfigDict()\n"
        f"    c.settings = [{{'name': '{'x' * 260}', 'experiment': 'mlp_mnist1d', "
        "'arg': 'quick', 'overrides': {}}]\n"
        "    c.optimizers = {'sgd': {'name': 'sgd', 'learning_rate': 0.05}}\n"
        "    c.seeds, c.overrides = [0], {}\n"
        "    return c\n"
    )
    workdir = tmp_path / "sw"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "regime_jax.sweep",
            f"--config={config_file}",
            f"--workdir={workdir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("regime_jax.sweep: error: setting name 'xxxx") and "260 bytes" in line
    assert not workdir.exists()
