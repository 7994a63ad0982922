"""Every packaged config runs in :quick mode (tfds ones under tfds.testing.mock_data), through
the one loader, ``regime_jax.configs.load``, by name or by path."""

from __future__ import annotations

import importlib

import pytest
import tensorflow_datasets as tfds

from regime_jax import configs, data, records
from regime_jax.configs.base import ConfigError
from regime_jax.run import loop

NAMES = configs.names()
SWEEPS = configs.SWEEPS  # sweep configs: python -m regime_jax.sweep
RUNS = [n for n in NAMES if n not in SWEEPS]


def _quick(name):
    return configs.load(f"{name}:quick")


def test_every_config_is_packaged():
    assert set(NAMES) >= {
        "mlp_mnist1d",
        "mlp_digits",
        "mlp_mnist",
        "cnn_digits",
        "cnn_mnist1d",
        "cnn_mnist",
        "cnn_cifar10",
        "vit_cifar10",
        "transformer_mnist1d",
        "resnet18_cifar10",
        "vit_s16_cifar10",
        "gpt_shakespeare",
        "stability_mlp_mnist1d",
        "stability_cnn_digits",
        "reproduce",
        "decoupled",
    }
    assert all("dataset" in _quick(n) for n in RUNS)
    assert all("settings" in _quick(n) for n in SWEEPS)


@pytest.mark.parametrize("name", NAMES)
def test_docstring_holds_command_and_expected_result(name):
    doc = importlib.import_module(f"regime_jax.configs.{name}").__doc__ or ""
    assert "COMMAND" in doc and "EXPECTED" in doc, f"{name}: docstring needs both"
    assert f"--config {name} " in doc, f"{name}: command does not name the config"


@pytest.mark.parametrize("name", [n for n in RUNS if _quick(n).dataset.name not in data.TFDS])
def test_quick_variant_runs_and_reads_back(name, tmp_path):
    config = _quick(name)
    last = loop.train_and_evaluate(config, tmp_path)
    run = records.load_run(tmp_path)
    assert run.rows[-1]["step"] == config.num_steps == last["step"]
    assert run.mask_steps[0] == 0 and run.mask_steps[-1] == config.num_steps
    assert "flip/all" in run.keys() and "eval/acc" in run.keys()


@pytest.mark.parametrize("name", [n for n in RUNS if _quick(n).dataset.name in data.TFDS])
def test_tfds_experiment_under_mock_data(name, tmp_path):
    config = _quick(name)
    with tfds.testing.mock_data(num_examples=96):
        loop.train_and_evaluate(config, tmp_path)
    run = records.load_run(tmp_path)
    assert run.rows[-1]["step"] == config.num_steps
    first = run.masks(0)
    assert all(p.bits.shape[0] == config.probe.size for p in first.values())


def test_unknown_name_is_one_line_listing_the_names():
    with pytest.raises(ConfigError) as err:
        configs.load("mlp_mnist2d:quick")
    line = str(err.value)
    assert "\n" not in line and "'mlp_mnist2d'" in line and "did you mean mlp_mnist1d?" in line
    assert all(name in line for name in NAMES)


def test_a_missing_file_names_the_packaged_config():
    with pytest.raises(ConfigError, match=r"does not exist.*--config mlp_mnist1d$"):
        configs.load("experiments/mlp_mnist1d.py:quick")


def test_a_file_of_your_own_inherits_from_a_packaged_config(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(
        "from regime_jax.configs import mlp_mnist1d\n\n\n"
        "def get_config(arg=None):\n"
        "    c = mlp_mnist1d.get_config(arg)\n"
        "    c.model.hidden = (32, 32)\n"
        "    return c\n"
    )
    mine, main = configs.load(f"{path}:quick"), configs.load("mlp_mnist1d:quick")
    assert mine.model.hidden == (32, 32) and mine.num_steps == main.num_steps == 40
    (tmp_path / "broken.py").write_text("def get_config(arg=None):\n    return 1 / 0\n")
    with pytest.raises(ConfigError, match=r"ZeroDivisionError.*broken\.py:2\)$"):
        configs.load(str(tmp_path / "broken.py"))


def test_variants_inherit_without_changing_their_parent():
    """A child's edits never leak into its parent's config (each call builds a fresh one)."""
    before = configs.load("cnn_digits").to_dict()
    for name in NAMES:
        configs.load(name)
        configs.load(f"{name}:quick")
    assert configs.load("cnn_digits").to_dict() == before
    assert configs.load("stability_cnn_digits").model == configs.load("cnn_digits").model
