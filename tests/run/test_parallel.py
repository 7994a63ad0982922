"""8 simulated CPU devices and several steps per call: the records of 1 device, one step a call.

The 8-device process is a subprocess (the device count is fixed when JAX starts), started once:
``tests/_parallel_run.py`` trains one small config with ``(parallel.devices, steps_per_call)``
= (1, 1), (8, 1), (1, 8) and (8, 8) there.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import jax
import numpy as np
import pytest
from conftest import tiny_config

from regime_jax import records, sweep
from regime_jax.configs.base import ConfigError
from regime_jax.run import checkpoint, loop

HERE = Path(__file__).parents[1]  # tests/, where _parallel_run.py lives
FLOAT_RTOL = 1e-4


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("parallel")
    proc = subprocess.run(
        [sys.executable, str(HERE / "_parallel_run.py"), str(workdir)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=HERE.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, json.loads(proc.stdout.strip().splitlines()[-1])


def _rows(workdir):
    return [json.loads(x) for x in (workdir / records.METRICS).read_text().splitlines()]


@pytest.mark.parametrize("variant", ["d8k1", "d1k8", "d8k8"])
def test_devices_and_steps_per_call_give_the_records_of_one_device_one_step(eight, variant):
    workdir, out = eight
    assert out["devices"] == 8
    one, many = _rows(workdir / "d1k1"), _rows(workdir / variant)
    assert [r["step"] for r in one] == [r["step"] for r in many]
    for a, b in zip(one, many, strict=True):
        assert set(a) == set(b), a["step"]
        for key in a:
            if key == "step" or key.split("/")[0] in ("flip", "dead", "always_on"):
                assert a[key] == b[key], (a["step"], key)  # counts reduce exactly
            elif isinstance(a[key], float):
                np.testing.assert_allclose(b[key], a[key], rtol=FLOAT_RTOL, err_msg=key)
    snaps = sorted(p.name for p in (workdir / "d1k1" / records.MASKS_DIR).glob("*.npz"))
    assert snaps == sorted(p.name for p in (workdir / variant / records.MASKS_DIR).glob("*.npz"))
    assert len(snaps) == 7  # 0, 4, 8, ..., 20 and the last step, 23
    for name in snaps:
        m1 = records.read_masks(workdir / "d1k1" / records.MASKS_DIR / name)
        m8 = records.read_masks(workdir / variant / records.MASKS_DIR / name)
        for layer in m1:
            np.testing.assert_array_equal(m1[layer].bits, m8[layer].bits)


def test_one_device_steps_per_call_is_bit_identical_on_cpu(eight):
    workdir, _ = eight
    text = lambda d: (workdir / d / records.METRICS).read_text()
    assert text("d1k8") == text("d1k1")


def test_arrays_are_sharded_and_each_variant_traces_once(eight):
    _, out = eight
    assert out["probe_on_data"] and out["probe_shards"] == 8
    assert out["batch_on_data"]
    assert out["params_replicated"] and out["params_devices"] == 8
    assert out["flip_is_scalar"]
    # a chunk's stacked batches [T, B, ...] are split on B: 4 steps x 4 of 32 examples each
    assert out["chunk_batch_on_data"]
    assert out["chunk_batch_shards"] == 8 and out["chunk_batch_shard_shape"] == [4, 4, 40]
    assert out["chunk_flip_shape"] == [4] and out["chunk_flip_replicated"]
    assert out["chunk_snaps_shape"] == [2, 24]  # 2 snapshot slots, not 4 mask sets
    assert out["chunk_params_replicated"]
    for devices in (1, 8):
        assert out[f"step_traces_d{devices}k1"] == {"True": 1, "False": 1}
        assert f"chunk_traces_d{devices}k1" not in out or not out[f"chunk_traces_d{devices}k1"]
        # K=8: spans 10, 10, 3 -> chunks 8 2 | 8 2 | 2 1: lengths 8 and 2 traced once each
        assert out["planned_lengths"] == [1, 2, 8]
        assert out[f"chunk_traces_d{devices}k8"] == {"2": 1, "8": 1}


def test_sizes_and_device_count_are_validated(eight):
    _, out = eight
    assert "batch_size=32 is not divisible by parallel.devices=3" in out["error_3"]
    assert "parallel.devices=16 but this process has 8 local device(s)" in out["error_16"]


def test_more_devices_than_present_stops_before_any_write(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel\.devices=2 but this process has 1"):
        loop.train_and_evaluate(tiny_config(**{"parallel.devices": 2}), tmp_path / "w")
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------ several processes


class _Saves:
    """Stands in for orbax in a one-process simulation: records which steps were saved."""

    steps: ClassVar[list[int]] = []

    def __init__(self, workdir, keep):
        _Saves.steps = []

    def save(self, step, state):
        _Saves.steps.append(step)

    def restore_latest(self, like):
        return None

    def close(self):
        pass


def test_a_process_other_than_0_writes_nothing_but_saves_checkpoints(tmp_path, monkeypatch, capsys):
    config = tiny_config(**{"steps_per_call": 4, "checkpoint.every_steps": 4})
    primary = loop.train_and_evaluate(config, tmp_path / "p0")
    capsys.readouterr()
    monkeypatch.setattr(jax, "process_index", lambda *a: 1)
    monkeypatch.setattr(checkpoint, "Checkpointer", _Saves)
    other = loop.train_and_evaluate(config, tmp_path / "p1")
    assert not (tmp_path / "p1").exists()  # no lock, config, records, masks, events, summary
    assert capsys.readouterr().out == ""  # no progress lines
    assert _Saves.steps == [4, 8, 12]  # every process calls the checkpoint save
    assert other == primary  # it fetched the same metrics (and would stop on a NaN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


QUICK = "mlp_mnist1d"


def _distributed(workdir, *flags, processes=2, devices=4):
    """``processes`` CLI processes on one coordinator, ``devices`` CPU devices each."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}",
        "JAX_NUM_PROCESSES": str(processes),
    }
    command = [
        sys.executable, "-m", "regime_jax.main", "--distributed", f"--config={QUICK}:quick",
        f"--workdir={workdir}", *flags,
    ]  # fmt: skip
    return [
        subprocess.Popen(
            command,
            env={**env, "JAX_PROCESS_ID": str(i)},
            cwd=HERE.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]


def test_two_processes_of_four_devices_give_the_records_of_one(tmp_path):
    procs = _distributed(tmp_path / "two", "--config.steps_per_call=8")
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "step     40/40" in outs[0][0] and "step" not in outs[1][0]  # progress: process 0
    reference = sweep.load_experiment(QUICK, "quick")
    loop.train_and_evaluate(reference, tmp_path / "one")
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert set(a) == set(b)
        for key in a:
            if key == "step" or key.split("/")[0] in ("flip", "dead", "always_on"):
                assert a[key] == b[key], (a["step"], key)
            elif isinstance(a[key], float):
                np.testing.assert_allclose(b[key], a[key], rtol=FLOAT_RTOL, err_msg=key)
    snaps = sorted(p.name for p in (tmp_path / "two" / records.MASKS_DIR).glob("*.npz"))
    assert snaps == ["step_0000000.npz", "step_0000020.npz", "step_0000040.npz"]
    assert checkpoint.Checkpointer(tmp_path / "two", 3).steps() == [40]


@pytest.mark.heavy
def test_sigterm_to_one_process_stops_both_at_one_step_and_resume_is_identical(tmp_path):
    flags = ["--config.steps_per_call=8", "--config.num_steps=600", "--config.log_every_steps=10"]
    for p in _distributed(tmp_path / "ref", *flags):
        assert p.communicate(timeout=600) and p.returncode == 0
    procs = _distributed(tmp_path / "run", *flags)
    metrics = tmp_path / "run" / records.METRICS
    while procs[1].poll() is None and len(_lines(metrics)) < 150:
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGTERM)  # one host preempted: JAX's sync point tells the other
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [143, 143], outs[0][1][-2000:]
    steps = {int(err.split("interrupted at step ")[1].split(";")[0]) for _, err in outs}
    assert len(steps) == 1  # both stopped after the same chunk
    (stopped,) = steps
    assert json.loads(_lines(metrics)[-1])["step"] == stopped < 600
    assert checkpoint.Checkpointer(tmp_path / "run", 3).steps()[-1] == stopped
    for p in _distributed(tmp_path / "run", *flags):
        assert p.communicate(timeout=600) and p.returncode == 0
    assert _lines(tmp_path / "run" / records.METRICS) == _lines(tmp_path / "ref" / records.METRICS)


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []
