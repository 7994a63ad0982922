"""Checkpoint, resume and failure behaviour: no run is lost, no bad input goes unexplained."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from regime_jax import models, records, sweep
from regime_jax.configs.base import ConfigError
from regime_jax.configs.overrides import apply_overrides
from regime_jax.run import checkpoint, loop, signals, step
from regime_jax.schedule import Schedule

ROOT = Path(__file__).parents[2]
EXPERIMENT = "mlp_mnist1d"
# A run long enough to be killed mid-way (~2k steps of a small MLP, every step recorded).
OVERRIDES = {
    "num_steps": 600,
    "log_every_steps": 10,
    "eval_every_steps": 100,
    "record.every_steps": 1,
    "record.snapshot_every_steps": 50,
    "checkpoint.every_steps": 100,
    "checkpoint.keep": 2,
    "probe.size": 64,
}


def _config(**extra):
    config = sweep.load_experiment(EXPERIMENT, "quick")
    apply_overrides(config, {**OVERRIDES, **extra}, "test_resume")
    return config


def _command(workdir, **extra):
    flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **extra}.items()]
    return [
        sys.executable,
        "-m",
        "regime_jax.main",
        f"--config={EXPERIMENT}:quick",
        f"--workdir={workdir}",
        *flags,
    ]


def _rows(workdir):
    path = Path(workdir) / records.METRICS
    return path.read_text().splitlines() if path.exists() else []


def _start_and_signal(workdir, sig, after_rows, **extra):
    """Starts a run in a subprocess and sends ``sig`` once ``after_rows`` rows are written."""
    proc = subprocess.Popen(
        _command(workdir, **extra),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while len(_rows(workdir)) < after_rows and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def _assert_same_run(a, b):
    assert _rows(a) == _rows(b)  # byte-identical JSON: every value equal exactly
    snaps_a = sorted(p.name for p in (Path(a) / "masks").glob("*.npz"))
    assert snaps_a == sorted(p.name for p in (Path(b) / "masks").glob("*.npz"))
    for name in snaps_a:
        ma, mb = (
            records.read_masks(Path(a) / "masks" / name),
            records.read_masks(Path(b) / "masks" / name),
        )
        assert ma.keys() == mb.keys()
        for k in ma:
            np.testing.assert_array_equal(ma[k].bits, mb[k].bits)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of the same config, in this process."""
    workdir = tmp_path_factory.mktemp("reference")
    loop.train_and_evaluate(_config(), workdir)
    return workdir


def test_sigkill_then_resume_is_identical_to_an_uninterrupted_run(reference, tmp_path):
    code, out = _start_and_signal(tmp_path, signal.SIGKILL, after_rows=250)
    assert code == -signal.SIGKILL, out
    killed_at = json.loads(_rows(tmp_path)[-1])["step"]
    assert 0 < killed_at < OVERRIDES["num_steps"], "the kill did not land mid-run"
    done = subprocess.run(_command(tmp_path), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stdout
    _assert_same_run(reference, tmp_path)


def test_a_start_killed_before_its_config_starts_afresh(reference, tmp_path):
    """A kill between creating ``checkpoints/`` and writing ``config.json`` (found by the
    random-kill test) leaves a lock and an empty ``checkpoints/``: the same command starts
    afresh and reaches the uninterrupted run's records, instead of refusing to resume."""
    (tmp_path / checkpoint.CHECKPOINTS).mkdir()
    (tmp_path / ".lock").write_text("12345\n")  # a dead writer's lock file (no flock held)
    loop.train_and_evaluate(_config(), tmp_path)
    _assert_same_run(reference, tmp_path)


def test_sigint_saves_a_checkpoint_and_flushes_metrics(reference, tmp_path):
    code, out = _start_and_signal(tmp_path, signal.SIGINT, after_rows=150)
    assert code == 130, out
    last = json.loads(_rows(tmp_path)[-1])["step"]
    assert last < OVERRIDES["num_steps"]
    ckpts = checkpoint.Checkpointer(tmp_path, 2)
    assert ckpts.steps()[-1] == last  # the checkpoint is at the last flushed row
    ckpts.close()
    assert "resume" in out
    loop.train_and_evaluate(_config(), tmp_path)
    _assert_same_run(reference, tmp_path)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_metrics(tmp_path):
    config = tiny_config(
        num_steps=40,
        **{"optimizer.learning_rate": 1e8, "checkpoint.every_steps": 1, "log_every_steps": 1},
    )
    with pytest.raises(FloatingPointError, match=r"at step \d+") as err:
        loop.train_and_evaluate(config, tmp_path)
    bad_step = int(str(err.value).split("at step ")[1].split(";")[0])
    rows = [json.loads(r) for r in _rows(tmp_path)]
    assert [r["step"] for r in rows] == list(range(bad_step + 1))
    ckpts = checkpoint.Checkpointer(tmp_path, 3)
    assert ckpts.steps() and max(ckpts.steps()) < bad_step  # only good states were saved
    ckpts.close()


def test_nonfinite_exit_code_is_nonzero(tmp_path):
    done = subprocess.run(
        _command(tmp_path, **{"optimizer.learning_rate": 1e8}),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "non-finite" in done.stderr and "at step" in done.stderr


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    config = tiny_config(num_steps=12, **{"checkpoint.every_steps": 4, "checkpoint.keep": 3})
    loop.train_and_evaluate(config, tmp_path)
    latest = tmp_path / "checkpoints" / "12"
    victims = [p for p in latest.rglob("*") if p.is_file() and p.stat().st_size > 0]
    for victim in victims:
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    ckpts = checkpoint.Checkpointer(tmp_path, 3)
    model, tx, key = _model_and_tx(config)
    like = step.create_train_state(model, tx, key, np.zeros((24, 40), np.float32))
    at, _ = ckpts.restore_latest(like)
    assert at == 8 and "unreadable" in caplog.text
    for directory in (tmp_path / "checkpoints").iterdir():
        for f in directory.rglob("*"):
            if f.is_file():
                f.write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="could be restored"):
        ckpts.restore_latest(like)
    ckpts.close()


def _model_and_tx(config):

    model = models.create_model(config.model, 10)
    return model, step.make_optimizer(config.optimizer, config.num_steps), _key()


def _key():
    import jax

    return jax.random.key(0)


def test_unwritable_workdir_is_refused_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match=r"workdir=.*cannot be written"):
        loop.train_and_evaluate(tiny_config(), blocker / "run")


def test_resume_refuses_a_changed_result_field_but_not_log_cadence(tmp_path):
    loop.train_and_evaluate(tiny_config(), tmp_path)
    with pytest.raises(ConfigError, match=r"model\.hidden"):
        loop.train_and_evaluate(tiny_config(**{"model.hidden": (8, 8)}), tmp_path)
    before = _rows(tmp_path)
    loop.train_and_evaluate(tiny_config(log_every_steps=3), tmp_path)  # finished: a no-op
    assert _rows(tmp_path) == before


def test_sigterm_saves_a_checkpoint_exits_143_and_resumes_identically(reference, tmp_path):
    code, out = _start_and_signal(tmp_path, signal.SIGTERM, after_rows=150)
    assert code == 143, out
    assert "Traceback" not in out and "SIGTERM: interrupted at step" in out
    last = json.loads(_rows(tmp_path)[-1])["step"]
    ckpts = checkpoint.Checkpointer(tmp_path, 2)
    assert ckpts.steps()[-1] == last < OVERRIDES["num_steps"]
    ckpts.close()
    loop.train_and_evaluate(_config(), tmp_path)
    _assert_same_run(reference, tmp_path)


def _chunk_ends(k):
    return {c.last for c in Schedule.from_config(_config(steps_per_call=k)).chunks(0)}


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.heavy)]
)
def test_steps_per_call_stops_at_a_chunk_end_and_resumes_like_one_step_per_call(
    reference, tmp_path, sig
):
    code, out = _start_and_signal(tmp_path, sig, after_rows=150, steps_per_call=8)
    assert code == signals.exit_code(sig), out
    last = json.loads(_rows(tmp_path)[-1])["step"]
    assert last < OVERRIDES["num_steps"] and last in _chunk_ends(8)
    ckpts = checkpoint.Checkpointer(tmp_path, 2)
    assert ckpts.steps()[-1] == last  # saved at the exact step the records end
    ckpts.close()
    loop.train_and_evaluate(_config(steps_per_call=8), tmp_path)
    _assert_same_run(reference, tmp_path)  # the K=1 run's bytes (CPU)


@pytest.mark.heavy
def test_steps_per_call_sigkill_then_resume_is_identical(reference, tmp_path):
    code, out = _start_and_signal(tmp_path, signal.SIGKILL, after_rows=250, steps_per_call=8)
    assert code == -signal.SIGKILL, out
    done = subprocess.run(
        _command(tmp_path, steps_per_call=8), cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_run(reference, tmp_path)
