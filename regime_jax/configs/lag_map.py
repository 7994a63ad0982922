r"""Lag map: where the lag ratio T_step / T_flip appears, one factor at a time around a base.

The base: the MLP 40-256-256-10 on MNIST-1D (``mlp_mnist1d``, 4000 training examples), 2000
steps, batch 128, probe 256, flips every step, snapshots every 100 steps (no rasters needed),
optimizer columns ``sgd`` (momentum 0.9, lr 0.05) and ``adam`` (lr 1e-3). Each other setting
changes one thing, on one axis (the base lies on every axis at its value there):

  data          4k (base), 20k, 60k training examples (dataset.num_samples 5000/25000/75000)
  width         64, 256 (base), 1024, 2048
  depth         2 (base), 4, 6 hidden layers of 256
  optimizer     sgd_plain (momentum 0), sgd (base), adam (base), adamw (weight decay 1e-4):
                only the base runs sgd_plain and adamw (optimizers_only)
  schedule      constant (base), cosine (to 0 at num_steps), step (x0.1 at 50% and 75%)
  length        1x (base), 3x num_steps
  fit           base (interpolates its 4000 examples), 20% training-label noise, width 8
  architecture  mlp (base), a 1-block Transformer with a GELU FFN (transformer_gelu_mnist1d,
                dim 32, 2 heads, mlp 64, batch 64, probe 128, 1500 steps; its own cosine
                schedule with 200 warmup steps)

The report (report.md, "Lag map") gives per axis a table (value x optimizer: the geometric mean
of the per-seed lag ratios under the headline rule with its 95% bootstrap CI, seeds with a
ratio, why the others have none) and figures/lag_map.png (one panel per axis).

COMMAND:
  python -m regime_jax.sweep --config lag_map --workdir runs/lag_map --workers 2
  python -m regime_jax.report --workdir runs/lag_map   # rebuild the report from finished runs
  (smoke test: --config lag_map:quick --workdir /tmp/lag_map_quick)
  Interrupted sweeps resume: finished runs (summary.json present) are skipped.

EXPECTED (2 CPU cores shared with other jobs, 2026-12-08): one run alone on one core through
  python -m regime_jax.main with the sweep's overrides (process start-up and compilation
  included, ~5 s of it): base 2000 steps sgd 11.5 s, adam 12.3 s, adamw 9.6 s; step schedule
  9.5 s; label noise 9.7 s; 60k examples 26.5 s (of which MNIST-1D generation of 75000
  samples: 10.8 s; 25000: 3.6 s; data._mnist1d caches it in-process, so each worker generates
  each size once); width 1024: 36.9 s; width 2048: 118 s (hence 3 seeds, _SEEDS_COSTLY);
  depth 6: 17.7 s; 3x (6000 steps): 16.8 s; Transformer 1500 steps: 28.1 s.
  default 14 settings, 146 runs (the base x 4 optimizers, the others x sgd, adam; 5 seeds,
          width 2048: 3): ~2900 core-seconds of runs, so ~24 min of wall-clock with --workers 2
          plus the report (estimate from the runs above; not run here). Results: pending the
          full run (docs/results/lag_map.md).
  :quick  2 settings on 2 axes (width, optimizer), 10 runs of 200 steps (base: sgd, adam,
          sgd_plain; width_64: sgd, adam; 2 seeds): 41 s end to end on one core; its runs
          are too short for a lag ratio (every cell says why), it exercises the machinery.
"""

import ml_collections

from regime_jax.configs.base import variant

_OFFLINE = {
    "num_steps": 2000,
    "batch_size": 128,
    "record": {"every_steps": 1, "snapshot_every_steps": 100},
    "probe": {"size": 256},
    "log_every_steps": 200,
    "eval_every_steps": 200,
    # No intermediate checkpoints: these runs are short, so a killed one starts again from
    # step 0 (the sweep resumes from a checkpoint where one exists).
    "checkpoint": {"every_steps": 0},
}
_COLUMNS = ("sgd", "adam")  # every setting's optimizer columns
_SMALL_TRANSFORMER = {"num_layers": 1, "dim": 32, "num_heads": 2, "mlp_dim": 64}
_SEEDS = [0, 1, 2, 3, 4]
_SEEDS_COSTLY = 3  # width 2048: ~2 min a run on one core (EXPECTED): the first 3 seeds

# Each axis's values in plot order; the base's value on each is _BASE's.
_AXES = {
    "data": ["4k", "20k", "60k"],
    "width": [64, 256, 1024, 2048],
    "depth": [2, 4, 6],
    "optimizer": ["sgd_plain", "sgd", "adam", "adamw"],
    "schedule": ["constant", "cosine", "step"],
    "length": ["1x", "3x"],
    "fit": ["base", "label_noise_0.2", "width_8"],
    "architecture": ["mlp", "transformer_gelu"],
}
_BASE = {
    "data": "4k",
    "width": 256,
    "depth": 2,
    "optimizer": "columns",  # the optimizer axis's points are the base's optimizer columns
    "schedule": "constant",
    "length": "1x",
    "fit": "base",
    "architecture": "mlp",
}


def _setting(name: str, axis, value, overrides: dict, experiment: str = "mlp_mnist1d") -> dict:
    return {
        "name": name,
        "experiment": experiment,
        "arg": None,
        "overrides": overrides,
        "axis": axis,
        "value": value,
        "optimizers_only": list(_COLUMNS),  # the base alone runs sgd_plain and adamw
    }


def _settings() -> list[dict]:
    base = _setting("base", list(_BASE), list(_BASE.values()), {})
    base["optimizers_only"] = ["sgd", "adam", "sgd_plain", "adamw"]
    transformer = {"num_steps": 1500, "batch_size": 64, "probe.size": 128}
    transformer |= {"model": _SMALL_TRANSFORMER}
    out = [
        base,
        _setting("data_20k", "data", "20k", {"dataset.num_samples": 25000}),
        _setting("data_60k", "data", "60k", {"dataset.num_samples": 75000}),
        _setting("width_64", "width", 64, {"model.hidden": (64, 64)}),
        _setting("width_1024", "width", 1024, {"model.hidden": (1024, 1024)}),
        _setting("width_2048", "width", 2048, {"model.hidden": (2048, 2048)}),
        _setting("depth_4", "depth", 4, {"model.hidden": (256,) * 4}),
        _setting("depth_6", "depth", 6, {"model.hidden": (256,) * 6}),
        _setting("cosine", "schedule", "cosine", {"optimizer.schedule": "cosine"}),
        _setting("step", "schedule", "step", {"optimizer.schedule": "step"}),
        _setting("long_3x", "length", "3x", {"num_steps": 6000}),
        _setting("label_noise", "fit", "label_noise_0.2", {"dataset.label_noise": 0.2}),
        _setting("width_8", "fit", "width_8", {"model.hidden": (8, 8)}),
        _setting(
            "transformer_gelu",
            "architecture",
            "transformer_gelu",
            transformer,
            "transformer_gelu_mnist1d",
        ),
    ]
    out[5]["max_seeds"] = _SEEDS_COSTLY
    return out


def _quick() -> tuple[list[dict], dict]:
    tiny = {"num_steps": 200, "probe.size": 32, "model.hidden": (32, 32), "batch_size": 32}
    tiny |= {"record.snapshot_every_steps": 20, "log_every_steps": 50, "eval_every_steps": 50}
    tiny |= {"timescales.window": 9}
    base = _setting("base", ["width", "optimizer"], [32, "columns"], tiny)
    base["optimizers_only"] = ["sgd", "adam", "sgd_plain"]
    wide = _setting("width_64", "width", 64, tiny | {"model.hidden": (64, 64)})
    return [base, wide], {"width": [32, 64], "optimizer": ["sgd_plain", "sgd", "adam"]}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = variant(arg)
    c = ml_collections.ConfigDict()
    sgd = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9}
    c.optimizers = {
        "sgd": sgd,
        "adam": {"name": "adam", "learning_rate": 1e-3},
        "sgd_plain": sgd | {"momentum": 0.0},
        "adamw": {"name": "adamw", "learning_rate": 1e-3, "weight_decay": 1e-4},
    }
    c.seeds = list(_SEEDS)
    c.overrides = dict(_OFFLINE)
    c.settings = _settings()
    c.axes = _AXES
    if arg == "quick":
        c.settings, c.axes = _quick()
        c.seeds = [0, 1]
        c.optimizers = {k: v for k, v in c.optimizers.items() if k != "adamw"}
    return c
