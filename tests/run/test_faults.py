"""Faults: broken checkpoints, a second writer, lost or short records, preemption, no network."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import HAS_PROC, strict_json, tiny_config, wait_for_signal_handlers

from regime_jax import data, records
from regime_jax.analysis import summary
from regime_jax.configs.base import ConfigError
from regime_jax.run import checkpoint, loop, rundir
from regime_jax.schedule import Schedule

ROOT = Path(__file__).parents[2]
CKPT = {"num_steps": 12, "checkpoint.every_steps": 4, "checkpoint.keep": 3}


def _rows(workdir):
    return (Path(workdir) / records.METRICS).read_text().splitlines()


def _same_run(a, b):
    assert _rows(a) == _rows(b)
    names = sorted(p.name for p in (Path(a) / "masks").glob("*.npz"))
    assert names == sorted(p.name for p in (Path(b) / "masks").glob("*.npz"))
    for name in names:
        ma, mb = (records.read_masks(Path(d) / "masks" / name) for d in (a, b))
        for k in ma:
            np.testing.assert_array_equal(ma[k].bits, mb[k].bits)


@pytest.fixture(scope="module")
def ref12(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ref12")
    loop.train_and_evaluate(tiny_config(**CKPT), workdir)
    return workdir


def _truncate(step_dir):
    for f in step_dir.rglob("*"):
        if f.is_file() and f.stat().st_size:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def _empty_files(step_dir):
    for f in step_dir.rglob("*"):
        if f.is_file():
            f.write_bytes(b"")


CORRUPTIONS = {
    "truncated": _truncate,
    "emptied": _empty_files,
    "item_folder_missing": lambda d: shutil.rmtree(d / "default"),
    "array_data_missing": lambda d: [shutil.rmtree(p) for p in d.rglob("d") if p.is_dir()],
    "metadata_missing": lambda d: (d / "_CHECKPOINT_METADATA").unlink(),
}


HEAVY = pytest.mark.heavy
LIGHT = ("truncated", "item_folder_missing")  # the rest run with -m heavy


@pytest.mark.parametrize(
    "corrupt", [c if c in LIGHT else pytest.param(c, marks=HEAVY) for c in sorted(CORRUPTIONS)]
)
def test_broken_newest_checkpoint_is_set_aside_and_the_run_finishes(
    corrupt, ref12, tmp_path, caplog
):
    shutil.copytree(ref12, tmp_path / "w")
    workdir = tmp_path / "w"
    (workdir / "summary.json").unlink()
    CORRUPTIONS[corrupt](workdir / "checkpoints" / "12")
    caplog.set_level(logging.WARNING)
    loop.train_and_evaluate(tiny_config(**CKPT), workdir)
    _same_run(ref12, workdir)
    assert json.loads((workdir / "summary.json").read_text())["complete"]
    if corrupt != "metadata_missing":  # orbax reads a step without its metadata file
        assert "checkpoint at step 12 is unreadable" in caplog.text
        assert (workdir / "broken_checkpoints" / "12").is_dir()
    # and again: a rerun of the finished run is a no-op, not "step 12 already exists"
    loop.train_and_evaluate(tiny_config(**CKPT), workdir)
    _same_run(ref12, workdir)


def test_every_checkpoint_broken_is_one_line_each_and_nothing_is_moved(ref12, tmp_path, caplog):
    shutil.copytree(ref12, tmp_path / "w")
    for step_dir in (tmp_path / "w" / "checkpoints").iterdir():
        _truncate(step_dir)
    with pytest.raises(checkpoint.CheckpointError) as err:
        loop.train_and_evaluate(tiny_config(**CKPT), tmp_path / "w")
    lines = str(err.value).splitlines()
    assert len(lines) == 5 and [ln.split(":")[0].strip() for ln in lines[1:4]] == [
        "step 12",
        "step 8",
        "step 4",
    ]
    assert "overwrite=True" in lines[-1] and "file content" not in caplog.text
    assert not (tmp_path / "w" / "broken_checkpoints").exists()


# ------------------------------------------------------------------ records vs checkpoints


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("delete", "metrics.jsonl is missing"),
        ("short", "lacks 4 row(s) up to step 12"),
        pytest.param("middle", "line 3 is not a metrics row", marks=HEAVY),
        pytest.param("twice", "was written by two processes", marks=HEAVY),
        pytest.param("snapshot", "step_0000008.npz is missing", marks=HEAVY),
    ],
)
def test_records_that_end_before_the_checkpoint_are_refused(damage, expected, ref12, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(ref12, workdir)
    path = workdir / records.METRICS
    lines = path.read_text().splitlines(keepends=True)
    if damage == "delete":
        path.unlink()
    elif damage == "short":
        path.write_text("".join(lines[:9]))
    elif damage == "middle":
        path.write_text("".join([*lines[:2], "garbage\n", *lines[3:]]))
    elif damage == "twice":
        path.write_text("".join([*lines, *lines[1:3]]))
    else:
        records.mask_path(workdir, 8).unlink()
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    before.pop(workdir / rundir.LOCK, None)
    with pytest.raises(records.RecordError) as err:
        loop.train_and_evaluate(tiny_config(**CKPT), workdir)
    assert expected in str(err.value) and "--config.overwrite=True" in str(err.value)
    after = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    after.pop(workdir / rundir.LOCK, None)
    assert after == before  # refused without touching the run
    if damage == "delete":
        loop.train_and_evaluate(tiny_config(**CKPT, overwrite=True), workdir)
        _same_run(ref12, workdir)


def test_a_torn_last_line_is_dropped_and_rewritten(ref12, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(ref12, workdir)
    shutil.rmtree(workdir / "checkpoints" / "12")
    path = workdir / records.METRICS
    text = path.read_text()
    path.write_text(text[: text.index('{"step": 10')] + '{"step": 10, "train/lo')
    loop.train_and_evaluate(tiny_config(**CKPT), workdir)
    _same_run(ref12, workdir)


def test_summary_is_complete_only_with_every_expected_row(tmp_path):
    config = tiny_config(
        num_steps=12,
        **{"record.every_steps": 3, "record.snapshot_every_steps": 3, "eval_every_steps": 4},
    )
    loop.train_and_evaluate(config, tmp_path)
    steps = [json.loads(r)["step"] for r in _rows(tmp_path)]
    assert steps == Schedule.from_config(config).expected_rows() == [0, 3, 4, 6, 8, 9, 12]
    assert json.loads((tmp_path / "summary.json").read_text())["complete"]
    lines = _rows(tmp_path)
    (tmp_path / records.METRICS).write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    assert not summary.summarize_run(tmp_path)["complete"]


def test_expected_steps_match_the_loop_with_stability_points(tmp_path):
    config = tiny_config(num_steps=30, **{"record.every_steps": 5, "stability.num_points": 4})
    config.record.snapshot_every_steps = 10
    config.stability.num_directions, config.stability.num_radii = 2, 2
    loop.train_and_evaluate(config, tmp_path)
    run = records.load_run(tmp_path)
    schedule = Schedule.from_config(config)
    rows, snaps = schedule.expected_rows(), schedule.expected_snapshots()
    assert [r["step"] for r in run.rows] == rows and run.mask_steps == snaps
    assert schedule.stability_steps <= set(rows)


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    records.write_atomic(path, "old")

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        records.write_atomic(path, "new")
    assert path.read_text() == "old"


# ------------------------------------------------------------------ extending, NaN


def test_raising_num_steps_continues_a_constant_schedule_run(tmp_path):
    short, long = tmp_path / "short", tmp_path / "long"
    extra = {"eval_every_steps": 6, "checkpoint.every_steps": 6}
    loop.train_and_evaluate(tiny_config(num_steps=12, **extra), short)
    loop.train_and_evaluate(tiny_config(num_steps=24, **extra), short)
    loop.train_and_evaluate(tiny_config(num_steps=24, **extra), long)
    _same_run(long, short)
    assert json.loads((short / "summary.json").read_text())["complete"]


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"optimizer.schedule": "cosine"}, "decays over num_steps"),
        pytest.param(
            {"record.every_steps": 5, "record.snapshot_every_steps": 5},
            "not a multiple",
            marks=HEAVY,
        ),
    ],
)
def test_raising_num_steps_is_refused_where_results_depend_on_it(override, reason, tmp_path):
    loop.train_and_evaluate(tiny_config(num_steps=12, **override), tmp_path)
    with pytest.raises(ConfigError, match=reason):
        loop.train_and_evaluate(tiny_config(num_steps=24, **override), tmp_path)
    with pytest.raises(ConfigError, match="below the run's num_steps=12"):
        loop.train_and_evaluate(tiny_config(num_steps=6, **override), tmp_path)


@pytest.mark.parametrize("every", [0, pytest.param(1, marks=HEAVY)])
def test_nonfinite_message_names_the_kept_checkpoint_or_says_there_is_none(every, tmp_path):
    config = tiny_config(
        num_steps=40,
        **{"optimizer.learning_rate": 1e8, "checkpoint.every_steps": every, "log_every_steps": 1},
    )
    with pytest.raises(loop.NonFinite) as err:
        loop.train_and_evaluate(config, tmp_path)
    rows = [strict_json(line) for line in _rows(tmp_path)]  # non-finite values: null
    loaded = records.load_run(tmp_path).rows
    nulls = [(i, k) for i, row in enumerate(rows) for k, v in row.items() if v is None]
    assert all(np.isnan(loaded[i][k]) for i, k in nulls)
    kept = checkpoint.Checkpointer(tmp_path, 3)
    steps = kept.steps()
    kept.close()
    if every:
        assert steps and f"newest good checkpoint is step {steps[-1]}" in str(err.value)
    else:
        assert not steps and "no checkpoint was saved" in str(err.value)
    assert "--config.overwrite=True" in str(err.value)


# ------------------------------------------------------------------ several steps per call


def test_steps_per_call_run_and_its_broken_checkpoint_fallback_match_one_step_per_call(
    ref12, tmp_path
):
    workdir = tmp_path / "k4"  # checkpoints at 4, 8, 12 and eval at 6 cut K=4 chunks: 4 2 2 4
    loop.train_and_evaluate(tiny_config(**CKPT, steps_per_call=4), workdir)
    _same_run(ref12, workdir)  # bit-identical on CPU
    (workdir / "summary.json").unlink()
    _truncate(workdir / "checkpoints" / "12")
    loop.train_and_evaluate(tiny_config(**CKPT, steps_per_call=4), workdir)  # resumes at 8
    _same_run(ref12, workdir)
    assert (workdir / "broken_checkpoints" / "12").is_dir()


def test_steps_per_call_refuses_to_resume_a_run_of_another_k(ref12, tmp_path):
    shutil.copytree(ref12, tmp_path / "w")
    with pytest.raises(ConfigError, match=r"differs in \['steps_per_call'\]"):
        loop.train_and_evaluate(tiny_config(**CKPT, steps_per_call=4), tmp_path / "w")


@pytest.mark.parametrize("k", [1, 8])
def test_nonfinite_mid_chunk_ends_the_records_at_that_step(k, tmp_path):
    config = tiny_config(
        num_steps=40, steps_per_call=k, **{"optimizer.learning_rate": 1e8, "log_every_steps": 10}
    )
    with pytest.raises(loop.NonFinite, match=r"at step \d+") as err:
        loop.train_and_evaluate(config, tmp_path)
    bad = int(str(err.value).split("at step ")[1].split(";")[0])
    assert [json.loads(r)["step"] for r in _rows(tmp_path)] == list(range(bad + 1))
    assert max(records.load_run(tmp_path).mask_steps) <= bad


# ------------------------------------------------------------------ one writer per workdir


def _cli(workdir, *extra):
    return [
        sys.executable,
        "-m",
        "regime_jax.main",
        "--config=mlp_mnist1d:quick",
        f"--workdir={workdir}",
        "--config.model.hidden=(16,12)",
        *extra,
    ]


def test_a_second_process_on_a_live_workdir_exits_2_naming_the_holder(tmp_path):
    with rundir.lock(tmp_path):
        done = subprocess.run(_cli(tmp_path), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"regime_jax: error: workdir={str(tmp_path)!r} is in use by process {os.getpid()} "
        f"(lock file {tmp_path / rundir.LOCK}); wait for it to finish, stop it, or use another "
        f"workdir"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.LOCK]


def test_a_lock_held_by_a_killed_process_does_not_block(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from regime_jax import rundir\n"
            "with rundir.lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(rundir.WorkdirBusy, match=f"in use by process {holder.pid}"):
        with rundir.lock(tmp_path):
            pass
    holder.kill()  # SIGKILL: no cleanup runs
    holder.wait()
    with rundir.lock(tmp_path):
        assert (tmp_path / rundir.LOCK).read_text().strip() == str(os.getpid())


# ------------------------------------------------------------------ signals


def test_sigterm_during_start_up_is_one_line_and_exit_143(tmp_path):
    proc = subprocess.Popen(
        _cli(tmp_path), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 60
    while not (tmp_path / rundir.LOCK).exists() and time.time() < deadline:
        time.sleep(0.005)  # the lock is taken after loading data, before compiling
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("regime_jax: ")


@pytest.mark.skipif(not HAS_PROC, reason="needs Linux /proc")
def test_sigint_during_imports_is_one_line_and_exit_130(tmp_path):
    proc = subprocess.Popen(
        _cli(tmp_path), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_signal_handlers(proc)  # then JAX is still being imported
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------ tfds without network


def test_tfds_download_without_network_fails_fast_and_leaves_nothing(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    tic = time.perf_counter()
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.load_dataset({"name": "mnist", "data_dir": str(tmp_path / "d"), "download": True})
    assert time.perf_counter() - tic < 30
    assert "cannot be reached" in str(err.value) and "tfds build mnist" in str(err.value)
    assert not (tmp_path / "d").exists()


def test_a_failed_download_removes_its_partial_files_only(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    root = tmp_path / "d"
    (root / "keep").mkdir(parents=True)

    def half_download(name, split, data_dir, download):
        if download:
            (root / "downloads" / name).mkdir(parents=True)
            (root / "downloads" / name / "part.tmp").write_text("x")
            raise ConnectionError("connection reset")
        raise FileNotFoundError("not prepared")

    monkeypatch.setattr(data, "_unreachable", lambda host, port: None)
    monkeypatch.setattr(tfds, "data_source", half_download)
    with pytest.raises(data.DatasetUnavailableError, match="ConnectionError"):
        data.load_dataset({"name": "mnist", "data_dir": str(root), "download": True})
    assert sorted(p.name for p in root.iterdir()) == ["keep"]
