"""Bad input fails before any training, with an error naming the field and allowed values."""

from __future__ import annotations

import pytest
import tensorflow_datasets as tfds
from conftest import tiny_config

from regime_jax import data
from regime_jax.configs.base import ConfigError, validate_config
from regime_jax.run import loop, step


@pytest.fixture
def no_training(monkeypatch):
    """Any attempt to build a train state fails the test: errors must come first."""

    def boom(*args, **kwargs):
        raise AssertionError("training started before the config error was raised")

    monkeypatch.setattr(step, "create_train_state", boom)
    monkeypatch.setattr(step, "make_step_fns", boom)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"dataset.name": "imagenet"}, ["dataset.name", "mnist1d", "digits", "cifar10"]),
        ({"model.name": "vgg"}, ["model.name", "mlp", "resnet", "gpt"]),
        ({"model.activation": "gelu"}, ["model.activation", "relu"]),
        ({"optimizer.name": "rmsprop"}, ["optimizer.name", "adam", "sgd"]),
        ({"optimizer.schedule": "linear"}, ["optimizer.schedule", "constant", "cosine", "step"]),
        ({"optimizer.learning_rate": 0.0}, ["optimizer.learning_rate", "positive"]),
        ({"optimizer.learning_rate": -1e-3}, ["optimizer.learning_rate", "positive"]),
        ({"batch_size": 0}, ["batch_size", "positive"]),
        ({"batch_size": -4}, ["batch_size", "positive"]),
        ({"num_steps": 0}, ["num_steps", "positive"]),
        ({"record.every_steps": 50}, ["record.every_steps", "1..12"]),
        ({"log_every_steps": 0}, ["log_every_steps", "positive"]),
        (
            {"record.snapshot_every_steps": 5, "record.every_steps": 2},
            ["record.snapshot_every_steps", "multiple"],
        ),
    ],
)
def test_bad_field_is_named_before_training(override, expected, tmp_path, no_training):
    config = tiny_config(**override)
    with pytest.raises(ConfigError) as err:
        loop.train_and_evaluate(config, tmp_path)
    for text in expected:
        assert text in str(err.value)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_probe_larger_than_validation_split(tmp_path, no_training):
    config = tiny_config(**{"dataset.name": "digits", "probe.size": 100_000})
    with pytest.raises(ValueError, match=r"probe.size=100000 must be in \[1, 359\]"):
        loop.train_and_evaluate(config, tmp_path)


def test_batch_larger_than_training_split():
    ds = data.load_dataset({"name": "digits"})
    with pytest.raises(ValueError, match="batch_size=5000"):
        next(data.batches(ds, 5000, 0))


def test_valid_config_passes():
    validate_config(tiny_config())


def test_missing_tfds_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.load_dataset({"name": "mnist", "data_dir": str(tmp_path), "download": False})
    message = str(err.value)
    assert "mnist" in message and "tfds build mnist" in message and "data_dir" in message
    assert "does not fall back" in message


def test_tfds_loader_under_mock_data():
    with tfds.testing.mock_data(num_examples=20):
        ds = data.load_dataset({"name": "cifar10"})
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_val.shape == (20, 32, 32, 3)
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


def test_warmup_not_below_num_steps_is_refused(tmp_path, no_training):
    config = tiny_config(**{"optimizer.warmup_steps": 12, "optimizer.schedule": "cosine"})
    with pytest.raises(ConfigError, match=r"optimizer\.warmup_steps=12; allowed values: 0\.\.11"):
        loop.train_and_evaluate(config, tmp_path)


def test_base_config_stability_and_timescales_are_the_dataclass_defaults():
    """base_config writes them as literals (no implementation import); they must not drift."""
    import dataclasses

    from regime_jax import stability
    from regime_jax.analysis import timescales
    from regime_jax.configs.base import base_config

    def typed(d):
        return {k: (type(v), v) for k, v in d.items()}

    c = base_config()
    own = {"num_points": 0, "num_examples": 0, "seed": 0}  # the in-training test's own fields
    probe = {k: v for k, v in c.stability.to_dict().items() if k not in own}
    assert {k: c.stability[k] for k in own} == own
    assert typed(probe) == typed(dataclasses.asdict(stability.StabilityConfig()))
    assert typed(c.timescales.to_dict()) == typed(dataclasses.asdict(timescales.DecayConfig()))
