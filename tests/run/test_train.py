"""The instrumented step and loop: traces once, correct masks, flips consistent with records."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest
from conftest import tiny_config

from regime_jax import data, models, records, stability, sweep
from regime_jax.configs.base import ConfigError
from regime_jax.run import checkpoint, loop, step
from regime_jax.schedule import log_spaced_steps


def _setup(config):
    ds = data.load_dataset(config.dataset)
    model = models.create_model(config.model, ds.num_classes)
    tx = step.make_optimizer(config.optimizer, config.num_steps)
    idx = data.probe_indices(len(ds.y_val), config.probe.size, config.probe.seed)
    probe = {"x": ds.x_val[idx], "y": ds.y_val[idx]}
    state = step.create_train_state(model, tx, jax.random.key(config.seed), probe["x"])
    return ds, model, tx, probe, state


FAMILIES = {  # model family -> the packaged config whose :quick model and dataset it uses
    "mlp": None,
    "cnn": "cnn_digits",
    "transformer": "transformer_mnist1d",
}
LAYERS = {
    "mlp": {"fc1", "fc2"},
    "cnn": {"conv1", "conv2", "fc1"},
    "transformer": {"block0/ffn/fc1"},
}


def family_config(family, **overrides):
    """tiny_config with the model and dataset of a family's quick experiment."""
    config = tiny_config(**overrides)
    if FAMILIES[family] is not None:
        quick = sweep.load_experiment(FAMILIES[family], "quick")
        config.model, config.dataset = quick.model, quick.dataset
    return config


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_step_variant_traces_once(family, tmp_path, monkeypatch):
    traces = collections.Counter()
    real_step = step.train_step

    def counting_step(*args, record, **kwargs):
        traces[record] += 1  # runs only while tracing
        return real_step(*args, record=record, **kwargs)

    monkeypatch.setattr(step, "train_step", counting_step)
    config = family_config(
        family, num_steps=30, **{"record.every_steps": 3, "record.snapshot_every_steps": 15}
    )
    loop.train_and_evaluate(config, tmp_path)
    assert traces == {True: 1, False: 1}
    assert set(records.load_run(tmp_path).masks(30)) == LAYERS[family]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_jitted_masks_equal_eager_recompute(family):
    config = family_config(family)
    ds, model, tx, probe, state = _setup(config)
    step_fn = step.make_step_fns(model, tx)[True]
    for i, batch in zip(range(4), data.batches(ds, config.batch_size, 0), strict=False):
        state, _metrics, masks = step_fn(state, batch, probe)
        with jax.disable_jit():
            eager = step.probe_patterns(model, state.params, probe["x"])
        assert set(masks) == LAYERS[family]
        for layer in masks:
            np.testing.assert_array_equal(masks[layer].bits, eager[layer].bits, err_msg=f"{i}")
            np.testing.assert_array_equal(masks[layer].bits, state.masks[layer].bits)
        assert int(state.step) == i + 1


def test_flip_rates_in_jsonl_equal_flips_between_snapshots(tmp_path):
    loop.train_and_evaluate(tiny_config(), tmp_path)
    run = records.load_run(tmp_path)
    assert run.mask_steps == list(range(13))
    rows = {r["step"]: r for r in run.rows}
    assert sorted(rows) == list(range(13))
    checked = 0
    for t in run.mask_steps[1:]:
        prev, cur = run.masks(t - 1), run.masks(t)
        total_flips = total_bits = 0
        for layer in cur:
            a, b = prev[layer].unpack(), cur[layer].unpack()
            np.testing.assert_allclose(rows[t][f"flip/{layer}"], np.mean(a != b), rtol=1e-6)
            total_flips, total_bits = total_flips + np.sum(a != b), total_bits + a.size
            checked += 1
        np.testing.assert_allclose(rows[t]["flip/all"], total_flips / total_bits, rtol=1e-6)
    assert checked == 24
    assert any(rows[s]["flip/all"] > 0 for s in range(1, 13)), "no flips at all: nothing tested"


def test_metrics_have_the_documented_keys(tmp_path):
    loop.train_and_evaluate(tiny_config(), tmp_path)
    run = records.load_run(tmp_path)
    keys = set(run.keys())
    for layer in ("fc1", "fc2"):
        assert {f"flip/{layer}", f"dead/{layer}", f"always_on/{layer}"} <= keys
    for part in ("fc1", "fc2", "head", "all"):
        assert {f"step/abs/{part}", f"step/rel/{part}"} <= keys
    assert {"train/loss", "train/acc", "eval/loss", "eval/acc", "flip/all"} <= keys
    eval_steps = [r["step"] for r in run.rows if "eval/acc" in r]
    assert eval_steps == [0, 6, 12]
    assert run.config["model"]["hidden"] == [16, 12]


# Golden one-step metrics: a change to the model, init, data order, loss or metrics moves them.
GOLDEN = {
    "train/loss": 2.458831548690796,
    "train/acc": 0.15625,
    "flip/all": 0.0074404762126505375,
    "step/abs/all": 0.04629763588309288,
    "step/rel/all": 0.007440750487148762,
}


def test_golden_one_step_metrics():
    config = tiny_config()
    ds, model, tx, probe, state = _setup(config)
    batch = next(data.batches(ds, config.batch_size, config.seed))
    _, metrics, _ = step.make_step_fns(model, tx)[True](state, batch, probe)
    got = {k: float(metrics[k]) for k in GOLDEN}
    assert got == pytest.approx(GOLDEN, rel=1e-4, abs=1e-7)


def test_rerun_with_a_different_config_is_refused_naming_fields(tmp_path):
    loop.train_and_evaluate(tiny_config(num_steps=6), tmp_path)
    with pytest.raises(ConfigError, match=r"\['num_steps', 'optimizer.learning_rate'\]"):
        loop.train_and_evaluate(
            tiny_config(num_steps=7, **{"optimizer.learning_rate": 0.2}), tmp_path
        )
    loop.train_and_evaluate(tiny_config(num_steps=7, overwrite=True), tmp_path)
    run = records.load_run(tmp_path)
    assert [r["step"] for r in run.rows] == list(range(8))
    assert run.mask_steps == list(range(8))


def test_stability_probe_runs_at_log_spaced_steps_and_matches_a_direct_call(tmp_path):
    overrides = {
        "stability.num_points": 3,
        "stability.num_examples": 8,
        "stability.num_directions": 2,
        "stability.num_radii": 4,
    }
    config = tiny_config(**overrides)
    loop.train_and_evaluate(config, tmp_path)
    run = records.load_run(tmp_path)
    probed = [r["step"] for r in run.rows if "stability/radius_q50" in r]
    assert probed == sorted(log_spaced_steps(12, 3)) == [0, 1, 3, 12]
    _, model, _, probe, state = _setup(config)
    direct = stability.perturbation_metrics(
        model,
        state.params,
        probe["x"][:8],
        jax.random.fold_in(jax.random.key(0), 0),
        loop.stability_config(config),
    )
    row0 = run.rows[0]
    for key, value in direct.items():
        want = float(value) if np.isfinite(value) else np.nan  # JSON null, read back as NaN
        np.testing.assert_allclose(float(row0[key]), want, rtol=1e-5, err_msg=key)
    kept = [row0[k] for k in sorted(k for k in row0 if k.startswith("stability/kept@"))]
    assert len(kept) == 4 and kept != [kept[0]] * 4  # the radii span stable and broken


def test_restore_returns_the_initial_and_newest_checkpointed_states(tmp_path):
    config = tiny_config(**{"checkpoint.every_steps": 5})
    loop.train_and_evaluate(config, tmp_path)
    restored = loop.restore(config, tmp_path)
    run = records.load_run(tmp_path)
    assert restored.step == 12 and int(restored.latest.step) == 12
    for layer, packed in run.masks(12).items():
        np.testing.assert_array_equal(restored.latest.masks[layer].bits, packed.bits)
    for layer, packed in run.masks(0).items():
        np.testing.assert_array_equal(restored.initial.masks[layer].bits, packed.bits)
    with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint"):
        loop.restore(config, tmp_path / "empty")
