"""A user's dataset, loss and registered names go through the built-in loop unchanged."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from conftest import tiny_config

from regime_jax import data, records, registry
from regime_jax.configs.base import ConfigError
from regime_jax.run import loop


def _arrays(seed: int = 0, n_train: int = 96, n_val: int = 48) -> data.Dataset:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(40, 3))
    x_train, x_val = (rng.normal(size=(n, 40)).astype(np.float32) for n in (n_train, n_val))
    y_train, y_val = ((x @ w).argmax(-1).astype(np.int32) for x in (x_train, x_val))
    return data.Dataset("blobs", x_train, y_train, x_val, y_val, 3)


def test_a_dataset_object_trains_and_is_recorded(tmp_path):
    ds = _arrays()
    last = loop.train_and_evaluate(tiny_config(num_steps=6), tmp_path, dataset=ds)
    assert last["step"] == 6 and 0.0 <= last["eval/acc"] <= 1.0
    stored = json.loads((tmp_path / "config.json").read_text())["dataset"]
    assert stored["name"] == "custom" and stored["label"] == "blobs" and stored["fingerprint"]
    # resuming with other arrays is refused: the fingerprint differs
    with pytest.raises(ConfigError):
        loop.train_and_evaluate(tiny_config(num_steps=6), tmp_path, dataset=_arrays(seed=1))


def test_a_custom_dataset_name_without_the_object_is_refused(tmp_path):
    config = tiny_config()
    config.dataset = {"name": "custom"}
    with pytest.raises(ConfigError, match=r"dataset=\.\.\."):
        loop.train_and_evaluate(config, tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_registered_dataset_is_a_config_name(tmp_path):
    calls = []

    def load(cfg):
        calls.append(cfg["seed"])
        return _arrays(seed=cfg["seed"])

    data.register_dataset("blobs_test", load)
    try:
        assert "blobs_test" in registry.DATASETS.names()
        config = tiny_config(num_steps=6, **{"dataset.name": "blobs_test", "dataset.seed": 3})
        loop.train_and_evaluate(config, tmp_path)
    finally:
        registry.DATASETS._factories.pop("blobs_test")
    assert calls == [3]
    assert records.load_run(tmp_path).config["dataset"]["name"] == "blobs_test"


def test_an_unknown_dataset_name_lists_the_registered_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.name='nope'.*'digits'.*'mnist1d'"):
        loop.train_and_evaluate(tiny_config(**{"dataset.name": "nope"}), tmp_path)


def test_loss_fn_replaces_cross_entropy(tmp_path):
    def smoothed(logits, y):
        labels = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), 0.2)
        return optax.softmax_cross_entropy(logits, labels)

    config = tiny_config(num_steps=6)
    plain = loop.train_and_evaluate(config, tmp_path / "plain")
    mine = loop.train_and_evaluate(config, tmp_path / "mine", loss_fn=smoothed)
    assert mine["train/loss"] != plain["train/loss"]
    # the gradient changed, so does the trajectory; accuracy is still reported
    assert mine["step/abs/all"] != plain["step/abs/all"] and "eval/acc" in mine
    stored = records.load_run(tmp_path / "mine").config["loss"]
    assert stored == {"name": "custom", "function": f"{__name__}.{smoothed.__qualname__}"}


def test_regression_labels_have_loss_but_no_accuracy(tmp_path):
    ds = _arrays()
    onehot = data.Dataset(
        "onehot",
        ds.x_train,
        np.eye(3, dtype=np.float32)[ds.y_train],
        ds.x_val,
        np.eye(3, dtype=np.float32)[ds.y_val],
        3,
    )
    mse = lambda logits, y: ((logits - y) ** 2).mean(-1)
    last = loop.train_and_evaluate(tiny_config(num_steps=6), tmp_path, dataset=onehot, loss_fn=mse)
    assert "eval/loss" in last and "flip/all" in last
    assert not any(k.endswith("/acc") for k in last)


def test_step_imports_no_files_signals_or_orbax():
    code = (
        "import sys, regime_jax.run.step as s; "
        "bad = [m for m in ('orbax', 'regime_jax.run.signals', 'regime_jax.records', "
        "'regime_jax.run.checkpoint', 'regime_jax.run.loop', 'regime_jax.report') "
        "if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
