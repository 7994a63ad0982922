"""One sweep over many processes: ``--workers N``, ``--task_index I --num_tasks N``, SLURM arrays.

Every run runs once, whichever process takes it (the run's lock decides), a finished run is
skipped, a killed one is resumed, and the records, summaries and report are those of a
single-process sweep (issue 23, bullet 7).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import pytest
from conftest import write_synthetic_run

from regime_jax import records, report, sweep
from regime_jax.analysis import summary
from regime_jax.configs.base import ConfigError
from regime_jax.run import loop, rundir

ROOT = Path(__file__).parents[2]
PREFIX = "regime_jax.sweep: error: "


def _tiny(num_steps: int = 12) -> dict:
    tiny = {"model.hidden": [16, 12], "batch_size": 32, "num_steps": num_steps, "probe.size": 24}
    tiny |= {"record": {"every_steps": 1, "snapshot_every_steps": 4}, "eval_batch_size": 256}
    return tiny | {"log_every_steps": 6, "eval_every_steps": 6, "checkpoint.every_steps": 0}


def _grid(seeds=(0, 1, 2)) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    overrides = _tiny()
    c.settings = [
        {"name": "tiny", "experiment": "mlp_mnist1d", "arg": "quick", "overrides": overrides}
    ]
    c.optimizers = {"sgd": {"name": "sgd", "learning_rate": 0.05}}  # seeds share compiles
    c.seeds = list(seeds)
    c.overrides = {}
    return c


PATHS = [f"tiny/sgd/seed_{k}" for k in (0, 1, 2)]  # units 0, 1, 2: task 0 of 2 owns 0 and 2


def _bytes(wd: Path) -> dict[str, bytes]:
    """Every run's records, and the sweep's grid, byte for byte."""
    out = {p: (wd / p / records.METRICS).read_bytes() for p in PATHS}
    return out | {"sweep.json": (wd / "sweep.json").read_bytes()}


def _summary(wd: Path) -> dict:
    """The sweep's summary.json with the workdir (the one thing that differs) taken out."""
    return json.loads((wd / "summary.json").read_text().replace(str(wd), "<wd>"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process sweep every multi-process one must equal."""
    wd = tmp_path_factory.mktemp("single") / "sw"
    out = sweep.run_sweep(_grid(), wd, log=lambda _: None)
    assert out["ran"] == PATHS and out["report"] is not None
    return wd


# --------------------------------------------------------------- assignment (no training)


def test_tasks_partition_units_and_a_unit_keeps_its_freeze_variants():
    grid = _grid()
    grid.freeze = {"multiples": [0.5, 2.0], "auto": True, "overrides": {}}
    specs = sweep.expand_grid(grid)
    units = sweep.units(specs)
    assert [len(u) for u in units] == [4, 4, 4] and [s for u in units for s in u] == specs
    assert all(len({(s.optimizer, s.seed) for s in u}) == 1 for u in units)
    assert all(u[0].setting == "tiny@never" for u in units)  # the reference comes first
    tasks = [sweep.Task(i, 3) for i in range(3)]
    owners = [[t.index for t in tasks if t.owns(k)] for k in range(len(units))]
    assert owners == [[0], [1], [2]]  # each unit exactly one owner, round robin
    assert [k for k in range(7) if sweep.Task(1, 3).owns(k)] == [1, 4]


@pytest.mark.parametrize(
    ("index", "count", "env", "expected"),
    [
        (None, None, {}, (0, 1)),
        (1, 3, {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}, (1, 3)),
        (None, None, {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}, (1, 2)),
        (
            None,
            None,
            {
                "SLURM_ARRAY_TASK_ID": "5",
                "SLURM_ARRAY_TASK_COUNT": "3",
                "SLURM_ARRAY_TASK_MIN": "3",
            },
            (2, 3),
        ),
        (
            None,
            None,
            {
                "SLURM_ARRAY_TASK_ID": "4",
                "SLURM_ARRAY_TASK_COUNT": "3",
                "SLURM_ARRAY_TASK_STEP": "2",
            },
            (2, 3),
        ),
    ],
)
def test_task_from_flags_else_slurm_array(index, count, env, expected):
    task = sweep.task_from(index, count, env)
    assert (task.index, task.count) == expected


@pytest.mark.parametrize(
    ("index", "count", "env", "match"),
    [
        (3, 2, {}, r"--task_index=3 with --num_tasks=2: allowed: 0 to 1"),
        (0, 0, {}, r"--num_tasks=0: allowed: an integer >= 1"),
        (1, None, {}, "go together"),
        (None, None, {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "2"}, "SLURM"),
        (None, None, {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}, "SLURM"),
    ],
)
def test_bad_task_is_one_line(index, count, env, match):
    with pytest.raises(ConfigError, match=match):
        sweep.task_from(index, count, env)


def test_devices_and_core_groups():
    assert sweep.parse_devices("0,1+2", 2) == ["0", "1,2"]
    assert sweep.parse_devices(None, 4) is None
    for bad, workers in (("0,1", 1), ("0,,1", 2), ("0;1", 2)):
        with pytest.raises(ConfigError, match="--devices"):
            sweep.parse_devices(bad, workers)
    assert sweep.core_groups([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3, 4]]
    assert sweep.core_groups([0, 1], 3) is None  # more workers than cores: nobody pinned
    env = sweep._worker_env(3, 4, ["0", "1"], None)
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert sweep._worker_env(1, 2, None, [[0], [1]])[sweep.CPUS_ENV] == "1"


def test_tasks_agree_on_the_grid_or_the_later_one_is_refused(tmp_path):
    A, B = '{"sweep": {"seeds": [0]}}\n', '{"sweep": {"seeds": [1]}}\n'
    first = sweep._Members(tmp_path, A)
    try:
        same = sweep._Members(tmp_path, A)  # a second task of the same sweep
        with pytest.raises(
            sweep.SweepConflict,
            match=r"different sweep config \(sweep.json differs in \['sweep.seeds'\]",
        ):
            sweep._Members(tmp_path, B)
        assert (tmp_path / "sweep.json").read_text() == A  # untouched
        assert not first.last()  # "same" still runs: it builds the report, not "first"
        assert same.last()
        same.close()
    finally:
        first.close()
    later = sweep._Members(tmp_path, B)  # nobody running: a rerun may change the grid
    assert (tmp_path / "sweep.json").read_text() == B and later.last()
    later.close()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--task_index=3", "--num_tasks=2"], "--task_index=3 with --num_tasks=2: allowed: 0 to 1"),
        (["--workers=0"], "--workers=0: allowed: an integer >= 1"),
    ],
)
def test_bad_flags_are_one_line_exit_2_before_any_write(tmp_path, flags, expected):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "regime_jax.sweep",
            "--config=reproduce:quick",
            "--workdir=w",
            *flags,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX + expected), lines
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------ runs, in process


def test_a_task_alone_takes_the_runs_nobody_started_and_the_other_skips_them(
    single, tmp_path, monkeypatch
):
    wd, log = tmp_path / "sw", []
    first = sweep.run_sweep(_grid(), wd, log=log.append, task=sweep.Task(0, 2))
    assert sorted(first["ran"]) == PATHS  # its own units, then task 1's (taken, from the end)
    assert sum("not started: taken by 0" in line for line in log) == 1
    assert _bytes(wd) == _bytes(single) and first["report"] is not None  # it was the last
    assert _summary(wd) == _summary(single)
    monkeypatch.setattr(report, "build_report", lambda wd: {"table": "", "report": wd})
    second = sweep.run_sweep(_grid(), wd, log=log.append, task=sweep.Task(1, 2))
    assert second["ran"] == [] and second["skipped"] == ["tiny/sgd/seed_1"]
    assert second["report"] is not None  # the last one running (re)builds the report


def _fake_train(calls: list):
    """A run in no time: synthetic records, the config, the summary (as train writes them)."""

    def train(config, workdir):
        calls.append(Path(workdir).name)
        write_synthetic_run(Path(workdir), n=config.num_steps, seed=config.seed)
        records.write_config(workdir, config.to_dict())
        summary.write_run_summary(workdir)

    return train


def test_a_run_held_by_a_live_process_is_left_to_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "train_and_evaluate", _fake_train(calls))
    monkeypatch.setattr(report, "build_report", lambda wd: {"table": "", "report": wd})
    wd = tmp_path / "sw"
    held = wd / "tiny/sgd/seed_0"
    code = (
        "import time; from regime_jax.run import rundir\n"
        f"with rundir.lock({str(held)!r}):\n print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        log = []
        out = sweep.run_sweep(_grid(), wd, log=log.append)
        assert out["busy"] == ["tiny/sgd/seed_0"] and out["ran"] == PATHS[1:]
        assert any(f"held by process {holder.pid}, left to it" in line for line in log)
        assert calls == ["seed_1", "seed_2"] and not (held / records.METRICS).exists()
    finally:
        holder.kill()
        holder.wait()
    again = sweep.run_sweep(_grid(), wd, log=lambda _: None)  # the holder died: run it now
    assert again["ran"] == ["tiny/sgd/seed_0"] and again["skipped"] == PATHS[1:]
    assert calls == ["seed_1", "seed_2", "seed_0"]  # every run once


def test_a_killed_run_is_resumed_and_its_records_are_unchanged(single, tmp_path, monkeypatch):
    """A run killed before its first checkpoint: the rerun resumes it (from step 0)."""
    wd = tmp_path / "sw"
    shutil.copytree(single, wd)
    killed = wd / "tiny/sgd/seed_1"
    (killed / "summary.json").unlink()
    shutil.rmtree(killed / "checkpoints")
    rows = (killed / records.METRICS).read_text().splitlines(keepends=True)
    (killed / records.METRICS).write_text("".join(rows[: len(rows) // 2]))
    configs = []
    real = loop.train_and_evaluate
    monkeypatch.setattr(loop, "train_and_evaluate", lambda c, w: configs.append(c) or real(c, w))
    monkeypatch.setattr(report, "build_report", lambda wd: {"table": "", "report": wd})
    out = sweep.run_sweep(_grid(), wd, log=lambda _: None)
    assert out["ran"] == ["tiny/sgd/seed_1"] and [c.overwrite for c in configs] == [False]
    assert _bytes(wd) == _bytes(single) and (killed / "summary.json").exists()


def test_the_lock_nests_in_one_process_and_refuses_another(tmp_path):
    code = f"from regime_jax.run import rundir\nwith rundir.lock({str(tmp_path)!r}): pass"
    with rundir.lock(tmp_path), rundir.lock(tmp_path):  # the sweep, then train, same process
        assert (tmp_path / rundir.LOCK).read_text().strip() == str(os.getpid())
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
        assert b"WorkdirBusy" in done.stderr and f"process {os.getpid()}".encode() in done.stderr
    fd = os.open(tmp_path / rundir.LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the outer block
    finally:
        os.close(fd)


# --------------------------------------------------------------- processes (heavy)

GRID_FILE = """
import ml_collections

def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.settings = [{{"name": "tiny", "experiment": "mlp_mnist1d", "arg": "quick",
                   "overrides": {overrides!r}}}]
    c.optimizers = {{"sgd": {{"name": "sgd", "learning_rate": 0.05}}}}
    c.seeds = [0, 1, 2]
    c.overrides = {{}}
    return c
"""


def _grid_file(tmp_path: Path, num_steps: int = 12) -> str:
    path = tmp_path / "grid.py"
    path.write_text(GRID_FILE.format(overrides=_tiny(num_steps)))
    return f"--config={path}"


def _ran(out: str) -> list[str]:
    """The runs a sweep's output says it trained (``t<i> [k/n] <rundir> | <s> s | ...``)."""
    lines = re.findall(r"^t\d+ \[\d+/\d+\] (\S+) \| [\d.]+ s \| eval/acc", out, re.M)
    return ["/".join(Path(line).parts[-3:]) for line in lines]


def _sweep_command(*args) -> list[str]:
    return [sys.executable, "-m", "regime_jax.sweep", "--nocompilation_cache", *args]


@pytest.mark.heavy
def test_two_workers_and_two_separate_tasks_equal_one_process(single, tmp_path):
    config = _grid_file(tmp_path)
    workers = subprocess.run(
        _sweep_command(config, f"--workdir={tmp_path / 'w2'}", "--workers=2"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert workers.returncode == 0, workers.stderr
    assert workers.stdout.count("report: ") == 2  # one built it, the other left it
    tasks = [
        subprocess.Popen(
            _sweep_command(config, f"--workdir={tmp_path / 't2'}"),
            cwd=ROOT,
            env={**os.environ, "SLURM_ARRAY_TASK_COUNT": "2"} | {"SLURM_ARRAY_TASK_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [t.communicate(timeout=600) for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outs
    ran = _ran("".join(out for out, _ in outs))
    assert sorted(ran) == PATHS  # every run once, none twice
    for wd in (tmp_path / "w2", tmp_path / "t2"):
        assert _bytes(wd) == _bytes(single)
        assert _summary(wd) == _summary(single)
        assert (wd / "report.md").read_text() == (single / "report.md").read_text().replace(
            str(single), str(wd)
        )


@pytest.mark.heavy
def test_a_task_killed_mid_sweep_and_rerun_completes_every_run_once(single, tmp_path):
    config, wd = _grid_file(tmp_path), tmp_path / "sw"
    args = (config, f"--workdir={wd}", "--task_index=0", "--num_tasks=2")
    proc = subprocess.Popen(_sweep_command(*args), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    second = wd / "tiny/sgd/seed_2"  # task 0's second run: killed once it has started
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not second.exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and "[1/3]" in out
    assert not (second / "summary.json").exists()  # killed mid-run
    rerun = subprocess.run(_sweep_command(*args), cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "[1/3]" in rerun.stdout and "finished before, skipped" in rerun.stdout
    assert _ran(rerun.stdout) == ["tiny/sgd/seed_2", "tiny/sgd/seed_1"]  # not run 1
    assert _bytes(wd) == _bytes(single) and _summary(wd) == _summary(single)


@pytest.mark.heavy
def test_sigint_to_the_workers_parent_stops_every_worker_with_a_checkpoint(tmp_path):
    wd = tmp_path / "sw"
    args = (_grid_file(tmp_path, num_steps=100_000), f"--workdir={wd}", "--workers=2")
    proc = subprocess.Popen(
        _sweep_command(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    first = [wd / PATHS[0] / records.METRICS, wd / PATHS[1] / records.METRICS]  # one per worker
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if all(m.exists() and m.read_text().count("\n") >= 2 for m in first):
            break  # both workers are in their training loops
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert out.count("STOPPED by SIGINT") == 2 and "worker(s) exited" in err
    for metrics in first:
        assert any((metrics.parent / "checkpoints").iterdir())  # saved at the stopping step
