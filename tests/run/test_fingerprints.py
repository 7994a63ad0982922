"""Runs know what they are: fingerprints of run directories, checkpoints and snapshots.

A sweep never reuses a finished run whose settings changed, a resume refuses foreign
checkpoints and a hand-edited ``config.json``, and a broken mask snapshot is set aside and
written again (issue 21, bullets 1 and 2).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from conftest import tiny_config

from regime_jax import records, sweep
from regime_jax.configs.base import ConfigError
from regime_jax.run import checkpoint, fingerprint, loop

CKPT = {"checkpoint.every_steps": 4, "checkpoint.keep": 3}


def _config(**extra):
    return tiny_config(**{**CKPT, **extra})


def _sweep(lr_a=0.05, lr_b=0.05):
    tiny = {"model.hidden": [16, 12], "batch_size": 32, "num_steps": 12, "probe.size": 24}
    tiny |= {"record": {"every_steps": 1, "snapshot_every_steps": 4}, "eval_batch_size": 256}
    tiny |= {"log_every_steps": 6, "eval_every_steps": 6, "checkpoint.every_steps": 0}
    c = ml_collections.ConfigDict()
    c.settings = [{"name": "tiny", "experiment": "mlp_mnist1d", "arg": "quick", "overrides": tiny}]
    c.optimizers = {
        "a": {"name": "sgd", "learning_rate": lr_a},
        "b": {"name": "sgd", "learning_rate": lr_b},
    }
    c.seeds = [0]
    c.overrides = {}
    return c


def _lr(rundir: Path) -> float:
    return json.loads((rundir / records.CONFIG).read_text())["optimizer"]["learning_rate"]


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    wd = tmp_path_factory.mktemp("sweep") / "sw"
    out = sweep.run_sweep(_sweep(), wd, log=lambda _: None)
    assert out["ran"] == ["tiny/a/seed_0", "tiny/b/seed_0"]
    return wd


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_sweep_rerun_with_a_changed_optimizer_setting_reruns_only_that_run(
    finished_sweep, tmp_path
):
    wd, log = _copy(finished_sweep, tmp_path), []
    before = (wd / "tiny/a/seed_0" / records.METRICS).read_bytes()
    same = sweep.run_sweep(_sweep(), wd, log=log.append)  # unchanged: both reused
    assert same["skipped"] == ["tiny/a/seed_0", "tiny/b/seed_0"] and same["ran"] == []
    out = sweep.run_sweep(_sweep(lr_b=0.1), wd, log=log.append)
    assert out["ran"] == ["tiny/b/seed_0"] and out["skipped"] == ["tiny/a/seed_0"]
    assert any("optimizer.learning_rate" in line and "afresh" in line for line in log)
    assert _lr(wd / "tiny/b/seed_0") == 0.1
    assert (wd / "tiny/a/seed_0" / records.METRICS).read_bytes() == before


def test_interrupted_sweep_rerun_with_a_changed_setting_does_not_mix(finished_sweep, tmp_path):
    wd = _copy(finished_sweep, tmp_path)
    (wd / "tiny/b/seed_0" / "summary.json").unlink()  # b was interrupted; a had finished
    out = sweep.run_sweep(_sweep(lr_a=0.02, lr_b=0.02), wd, log=lambda _: None)
    assert sorted(out["ran"]) == ["tiny/a/seed_0", "tiny/b/seed_0"]
    grid = json.loads((wd / "sweep.json").read_text())
    for run in grid["runs"]:  # every run's files say what sweep.json says
        assert _lr(wd / run["path"]) == run["config"]["optimizer"]["learning_rate"] == 0.02


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run with checkpoints at steps 4, 8 and 12."""
    wd = tmp_path_factory.mktemp("reference") / "run"
    loop.train_and_evaluate(_config(), wd)
    assert (wd / fingerprint.FILE).exists()
    return wd


def _killed_after_8(reference: Path, tmp_path: Path) -> Path:
    """The reference as a kill after step 8's checkpoint would leave it."""
    wd = _copy(reference, tmp_path)
    shutil.rmtree(wd / checkpoint.CHECKPOINTS / "12")
    records.truncate_after(wd, 8)
    return wd


def _same_records(a: Path, b: Path) -> None:
    assert (a / records.METRICS).read_bytes() == (b / records.METRICS).read_bytes()
    names = sorted(p.name for p in (a / records.MASKS_DIR).glob("*.npz"))
    assert names == sorted(p.name for p in (b / records.MASKS_DIR).glob("*.npz"))
    for name in names:
        ma = records.read_masks(a / records.MASKS_DIR / name)
        mb = records.read_masks(b / records.MASKS_DIR / name)
        assert ma.keys() == mb.keys()
        for k in ma:
            np.testing.assert_array_equal(ma[k].bits, mb[k].bits)


def test_foreign_checkpoints_are_refused_naming_the_field(reference, tmp_path):
    other = tmp_path / "other"
    loop.train_and_evaluate(_config(**{"optimizer.learning_rate": 0.1, "num_steps": 8}), other)
    wd = _killed_after_8(reference, tmp_path)
    before = (wd / records.METRICS).read_bytes()
    shutil.rmtree(wd / checkpoint.CHECKPOINTS)
    shutil.copytree(other / checkpoint.CHECKPOINTS, wd / checkpoint.CHECKPOINTS)
    with pytest.raises(checkpoint.CheckpointError) as err:
        loop.train_and_evaluate(_config(), wd)
    line = str(err.value)
    assert "\n" not in line and "optimizer.learning_rate" in line
    assert "--config.overwrite=True" in line
    assert (wd / records.METRICS).read_bytes() == before  # nothing resumed, nothing set aside
    assert not (wd / checkpoint.BROKEN).exists()


def test_hand_edited_config_with_the_matching_flag_is_refused(reference, tmp_path):
    wd = _killed_after_8(reference, tmp_path)
    stored = json.loads((wd / records.CONFIG).read_text())
    stored["optimizer"]["learning_rate"] = 0.1
    (wd / records.CONFIG).write_text(json.dumps(stored))
    with pytest.raises(
        ConfigError, match=r"config\.json was edited.*optimizer\.learning_rate.*overwrite=True"
    ):
        loop.train_and_evaluate(_config(**{"optimizer.learning_rate": 0.1}), wd)


def test_changed_flag_names_the_field_and_values(reference, tmp_path):
    wd = _killed_after_8(reference, tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"\['optimizer\.learning_rate'\] \(optimizer\.learning_rate: 0\.05 there, 0\.1 ",
    ):
        loop.train_and_evaluate(_config(**{"optimizer.learning_rate": 0.1}), wd)


@pytest.mark.parametrize(
    "damage", ["none", "truncated", pytest.param("swapped", marks=pytest.mark.heavy)]
)
def test_broken_snapshot_is_set_aside_and_written_again(reference, tmp_path, damage, capsys):
    wd = _killed_after_8(reference, tmp_path)
    victim = records.mask_path(wd, 6)
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "swapped":  # reads fine, but is another step's
        shutil.copyfile(records.mask_path(wd, 5), victim)
    loop.train_and_evaluate(_config(), wd)
    out = capsys.readouterr().out
    if damage == "none":
        assert "resuming" in out and "from step 8" in out
        assert not (wd / fingerprint.BROKEN_MASKS).exists()
    else:
        assert (wd / fingerprint.BROKEN_MASKS / victim.name).exists()
        assert "step 6 is broken" in out and "resuming from step 4" in out
    _same_records(wd, reference)
    assert json.loads((wd / "summary.json").read_text())["complete"] is True


def _before_compute_dtype(**extra):
    """A config as written before ``model.compute_dtype`` existed (a run of version 0.4.0)."""
    c = _config(**extra)
    del c.model["compute_dtype"]
    return c


def test_a_run_recorded_before_a_field_was_added_resumes_at_its_old_behaviour(tmp_path):
    """configs.base.ADDED_FIELDS: a run without ``model.compute_dtype`` in its config.json,
    fingerprint.json and checkpoint metadata is extended by today's config at float32, to the
    records of a run made today, and refused at bfloat16, naming the field."""
    old = tmp_path / "old"
    loop.train_and_evaluate(_before_compute_dtype(num_steps=8), old)
    for name in (records.CONFIG, fingerprint.FILE):
        text = (old / name).read_text()
        assert "compute_dtype" not in text, name  # really a run without the field

    bf16 = _copy(old, tmp_path / "bf16")
    with pytest.raises(ConfigError, match=r"model\.compute_dtype"):
        loop.train_and_evaluate(_config(num_steps=12, **{"model.compute_dtype": "bfloat16"}), bf16)

    loop.train_and_evaluate(_config(num_steps=12), old)  # extended: 8 -> 12 steps, float32
    today = tmp_path / "today"
    loop.train_and_evaluate(_config(num_steps=8), today)
    loop.train_and_evaluate(_config(num_steps=12), today)
    assert (old / records.METRICS).read_bytes() == (today / records.METRICS).read_bytes()
