"""Slow checks (``pytest -m heavy``): full experiments reach what README and docstrings state."""

from __future__ import annotations

import numpy as np
import pytest

from regime_jax import records, sweep
from regime_jax.run import loop


def _early_late(run, key):
    _, values = run.series(key)
    tenth = len(values) // 10
    return values[1 : tenth + 1].mean(), values[-tenth:].mean()


@pytest.mark.heavy
@pytest.mark.parametrize(
    ("name", "min_acc"), [("mlp_mnist1d", 0.65), ("mlp_digits", 0.97), ("cnn_digits", 0.97)]
)
def test_full_experiment_reaches_stated_accuracy_and_flips_decay(name, min_acc, tmp_path):
    loop.train_and_evaluate(sweep.load_experiment(name), tmp_path)
    run = records.load_run(tmp_path)
    assert run.series("eval/acc")[1][-1] >= min_acc
    early, late = _early_late(run, "flip/all")
    assert late < early / 10, (early, late)
    assert np.isfinite(run.series("step/abs/all")[1]).all()
