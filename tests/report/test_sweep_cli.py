"""``python -m regime_jax.sweep``: the same overrides and one-line errors as regime_jax.main."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HAS_PROC, wait_for_signal_handlers

ROOT = Path(__file__).parents[2]
QUICK = "--config=reproduce:quick"
PREFIX = "regime_jax.sweep: "

# Two optimizers, "a" before "b" (a ConfigDict keeps its keys sorted): a run of "a" fails or is
# stopped first, so whether the sweep goes on or stops is visible in "b".
TINY_SWEEP = """
import ml_collections

TINY = {{"num_steps": {num_steps}, "probe.size": 24, "model.hidden": (16, 12), "batch_size": 32,
        "log_every_steps": 5, "eval_every_steps": 10, "record.snapshot_every_steps": 5,
        "eval_batch_size": 256, "checkpoint.every_steps": 0}}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.settings = [{{"name": "tiny", "experiment": {experiment!r}, "arg": "quick",
                   "overrides": TINY}}]
    c.optimizers = {{"a": {{"name": "sgd", "learning_rate": 0.05}},
                    "b": {{"name": "sgd", "learning_rate": 0.05}}}}
    c.seeds = [0]
    c.overrides = {{}}
    return c
"""


def _tiny_sweep(tmp_path: Path, num_steps: int) -> str:
    path = tmp_path / "tiny_sweep.py"
    path.write_text(TINY_SWEEP.format(num_steps=num_steps, experiment="mlp_mnist1d"))
    return f"--config={path}"


def _command(*args) -> list[str]:
    return [sys.executable, "-m", "regime_jax.sweep", *args]


def _sweep(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(*args), cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs
    )


def _start_sweep(*args) -> subprocess.Popen:
    """The sweep in the background (to be signalled), output captured."""
    return subprocess.Popen(
        _command(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _one_line(done: subprocess.CompletedProcess, code: int, kind: str = "error: ") -> str:
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr + done.stdout
    assert len(lines) == 1 and lines[0].startswith(PREFIX + kind), done.stderr
    return lines[0].removeprefix(PREFIX + kind)


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--config.seedz=1", "the config has no field 'seedz'; did you mean seeds?"),
        (
            "--config.optimizers.sgd.learning_rat=1",
            "did you mean optimizers.sgd.learning_rate?",
        ),
        ("--config.overides.log_every_steps=5", "did you mean overrides?"),
    ],
)
def test_field_typo_is_one_line_with_did_you_mean(tmp_path, flag, expected):
    done = _sweep(QUICK, f"--workdir={tmp_path / 'w'}", flag)
    assert expected in _one_line(done, 2)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--config.optimizers.sgd.learning_rate=fast", "expected a float"),
        ("--config.seeds=a,b", "expected a list of int"),
        ("--config.optimizers.sgd=adam", "is a group of fields"),
        ("--config.settings=x", "cannot be set from the command line"),
    ],
)
def test_wrong_type_is_one_line(tmp_path, flag, expected):
    line = _one_line(_sweep(QUICK, f"--workdir={tmp_path / 'w'}", flag), 2)
    assert expected in line and flag.split("=")[0] in line
    assert not (tmp_path / "w").exists()


def test_overrides_reach_the_grid_which_is_validated_before_any_run(tmp_path):
    line = _one_line(
        _sweep(QUICK, f"--workdir={tmp_path / 'w'}", "--config.optimizers.sgd.learning_rate=-1"), 2
    )
    assert "setting 'mlp_mnist1d' (optimizer 'sgd'" in line
    assert "optimizer.learning_rate=-1.0" in line
    assert not (tmp_path / "w").exists()


def test_missing_config_file_or_a_run_config_is_one_line(tmp_path):
    line = _one_line(_sweep("--config=nope.py", f"--workdir={tmp_path}"), 2)
    assert "'nope.py' does not exist" in line
    line = _one_line(_sweep("--config=mlp_mnist1d:quick", f"--workdir={tmp_path / 'w'}"), 2)
    assert "is not a sweep config" in line and "python -m regime_jax.main" in line
    assert not (tmp_path / "w").exists()


def test_unknown_variant_names_the_allowed_ones(tmp_path):
    line = _one_line(_sweep(QUICK.replace(":quick", ":quik"), f"--workdir={tmp_path}"), 2)
    assert "':quik'" in line and "':quick'" in line and "':full'" in line


def test_missing_unknown_and_extra_arguments(tmp_path):
    assert "--workdir required" in _one_line(_sweep(QUICK), 2)
    line = _one_line(_sweep(QUICK, "--workdr=/x"), 2)
    assert "workdr" in line and "workdir" in line
    assert "unexpected" in _one_line(_sweep(QUICK, f"--workdir={tmp_path}", "x"), 2)


def test_help_lists_the_flags_and_the_sweep_fields_with_defaults():
    done = _sweep("--help")
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    for flag in ("--config:", "--workdir:", "--[no]compilation_cache:", "--verbosity:"):
        assert flag in done.stdout
    assert "--config.seeds='[0, 1, 2, 3, 4]'" in done.stdout
    assert "--config.optimizers.sgd.learning_rate=0.05" in done.stdout
    assert "--config.overrides.record.every_steps=1" in done.stdout
    assert "--config.settings=[mlp_mnist1d, mlp_digits, cnn_digits" in done.stdout
    done = _sweep(QUICK, "-h")
    assert done.returncode == 0 and "--config.seeds='[0, 1]'" in done.stdout


@pytest.mark.skipif(not HAS_PROC, reason="needs Linux /proc")
def test_sigterm_at_start_up_is_one_line_and_exit_143(tmp_path):
    proc = _start_sweep(QUICK, f"--workdir={tmp_path / 'w'}")
    wait_for_signal_handlers(proc)  # then JAX is still being imported
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "stopped by SIGTERM" in err


def test_sigint_during_a_run_stops_it_with_a_checkpoint_and_exits_130(tmp_path):
    workdir = tmp_path / "w"
    config = _tiny_sweep(tmp_path, 100_000)
    proc = _start_sweep(config, f"--workdir={workdir}")
    metrics = workdir / "tiny" / "a" / "seed_0" / "metrics.jsonl"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break  # in the training loop
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    line = _one_line(done, 130, kind="")
    assert line.startswith("tiny/a/seed_0: SIGINT: stopped at step"), line
    assert "STOPPED by SIGINT" in out
    assert any((metrics.parent / "checkpoints").iterdir())  # saved at the stopping step
    assert not (workdir / "tiny" / "b").exists()  # the sweep stopped: "b" never started


def test_failed_run_does_not_stop_the_grid_and_exit_is_1(tmp_path):
    workdir = tmp_path / "w"
    done = _sweep(
        _tiny_sweep(tmp_path, 12),
        f"--workdir={workdir}",
        "--nocompilation_cache",
        "--config.optimizers.a.learning_rate=1e30",  # non-finite at step 1: run "a" fails
    )
    assert _one_line(done, 1, kind="") == "1 run(s) failed: ['tiny/a/seed_0']"
    assert "[1/2]" in done.stdout and "FAILED NonFinite" in done.stdout
    assert (workdir / "tiny" / "b" / "seed_0" / "summary.json").exists()  # the grid went on
    grid = json.loads((workdir / "sweep.json").read_text())
    assert grid["sweep"]["optimizers"]["a"]["learning_rate"] == 1e30
