"""A run where nothing learns has no decay time for its step sizes and no lag ratio (issue 24).

Before the decay test, Adam at lr 1e-9 (step sizes flat with noise) "settled" at step 28 under
the settle rule and at 90% of the run under cumsum, and the ratios entered the statistics.
"""

from __future__ import annotations

import pytest

from regime_jax import configs
from regime_jax.analysis import summary, timescales
from regime_jax.run import loop

WHY = {"no_decay", "flat"}  # the statuses that say: nothing decayed


# ~10 s of CPU each (about 20 s wall on the shared 2-core machine): SGD only with -m heavy
@pytest.mark.parametrize("optimizer", ["adam", pytest.param("sgd", marks=pytest.mark.heavy)])
def test_a_run_that_does_not_learn_reports_no_decay_and_no_lag_ratio(optimizer, tmp_path):
    config = configs.load("mlp_mnist1d:quick")
    config.optimizer.name, config.optimizer.learning_rate = optimizer, 1e-9
    config.num_steps = 100  # > min_points (20) and several smoothing windows (25)
    config.probe.size = 64  # small and fast: the step sizes do not depend on it
    loop.train_and_evaluate(config, tmp_path)
    s = summary.RunSummary.load(tmp_path)
    assert s.complete and s.num_steps == 100
    for series in ("step/abs/all", "step/rel/all"):
        for rule in timescales.RULES:
            decay = s.decay_time(series, rule)
            assert decay.time is None and decay.status == "no_decay", (series, rule, decay)
            assert "no decay" in decay.message and decay.run_fraction is None
    for kind in summary.KINDS:
        for rule in timescales.RULES:
            lag = s.lag(kind, rule)
            assert lag.ratio is None and lag.budget_bound is None, (kind, rule, lag)
            assert "step_size: no_decay" in lag.status
            assert lag.t_flip.status in WHY  # flips are 0 (flat) or noise (no_decay)
    for layer in s.layer_names:
        assert s.layer_lag(layer).ratio is None
    for curve in s.lag_ratio_curves.values():
        assert all(r is None for r in curve["ratios"])
