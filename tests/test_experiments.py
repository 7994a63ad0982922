"""Every experiment config runs in :quick mode; tfds ones under tfds.testing.mock_data."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from regime_jax import data, loop, records

EXPERIMENTS = sorted(Path(__file__).parent.parent.glob("experiments/*.py"))


def load_config(path: Path, arg: str | None = "quick"):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (flax modules) look their module up there
    spec.loader.exec_module(module)
    return module.get_config(arg) if hasattr(module, "get_config") else None


def _configs():  # tfds configs run in test_tfds_experiment_under_mock_data
    out = []
    for path in EXPERIMENTS:
        config = load_config(path)
        if config is not None and "dataset" in config and config.dataset.name not in data.TFDS:
            out.append(pytest.param(path, config, id=path.stem))
    return out


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_docstring_holds_command_and_expected_result(path):
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "COMMAND" in doc and "EXPECTED" in doc, f"{path.name}: docstring needs both"
    assert f"experiments/{path.name}" in doc, f"{path.name}: command does not name the file"


@pytest.mark.parametrize(("path", "config"), _configs())
def test_quick_variant_runs_and_reads_back(path, config, tmp_path):
    last = loop.train_and_evaluate(config, tmp_path)
    run = records.load_run(tmp_path)
    assert run.rows[-1]["step"] == config.num_steps == last["step"]
    assert run.mask_steps[0] == 0 and run.mask_steps[-1] == config.num_steps
    assert "flip/all" in run.keys() and "eval/acc" in run.keys()


@pytest.mark.parametrize(
    "path",
    [
        p
        for p in EXPERIMENTS
        if (c := load_config(p)) is not None and "dataset" in c and c.dataset.name in data.TFDS
    ],
    ids=lambda p: p.stem,
)
def test_tfds_experiment_under_mock_data(path, tmp_path):
    config = load_config(path)
    with tfds.testing.mock_data(num_examples=96):
        loop.train_and_evaluate(config, tmp_path)
    run = records.load_run(tmp_path)
    assert run.rows[-1]["step"] == config.num_steps
    first = run.masks(0)
    assert all(p.bits.shape[0] == config.probe.size for p in first.values())
