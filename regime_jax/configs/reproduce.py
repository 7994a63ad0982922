r"""Reproduction grid: lag ratio T_step / T_flip (paper: 3.85x) over settings x optimizers x seeds.

Every run records flips at every step (probe set fixed: only ``config.seed`` changes across
seeds); the report gives, per setting and optimizer, the mean lag ratio with a 95% bootstrap CI
over seeds, per rule and per layer, a verdict against 3.85, and figures.

COMMAND:
  python -m regime_jax.sweep --config reproduce --workdir runs/reproduce
  python -m regime_jax.report --workdir runs/reproduce   # rebuild the report from finished runs
  (smoke test: --config reproduce:quick --workdir /tmp/reproduce_quick)
  (accelerator + tfds: --config reproduce:full --workdir runs/reproduce_full)
  Interrupted sweeps resume: finished runs (summary.json present) are skipped.

EXPECTED (2 CPU cores shared with other jobs):
  :quick  2 settings x 2 optimizers x 2 seeds, 8 runs of 200 steps: 34 s end to end (load ~4).
  default 4 settings x 2 optimizers x 5 seeds, 40 runs: TBD (budget < 45 min; estimated
          ~15 min from a 16-run probe of this grid at shorter lengths, 223 s in all).
  :full   needs the tfds datasets and an accelerator; not run here.
"""

import ml_collections

from regime_jax.config import variant

# Shared by every offline run: flips every step, a 256-example probe, sparse host logging,
# mask snapshots every 10 steps (the per-unit flip raster needs consecutive snapshots).
_OFFLINE = {
    "record": {"every_steps": 1, "snapshot_every_steps": 10},
    "probe": {"size": 256},
    "log_every_steps": 200,
    "eval_every_steps": 200,
    # The sweep restarts unfinished runs afresh, so intermediate checkpoints only cost time.
    "checkpoint": {"every_steps": 0},
}

_SMALL_TRANSFORMER = {"num_layers": 1, "dim": 32, "num_heads": 2, "mlp_dim": 64}


def _setting(name: str, overrides: dict, arg: str | None = None) -> dict:
    # experiment: a packaged config's name (regime_jax.configs), loaded by the sweep.
    return {"name": name, "experiment": name, "arg": arg, "overrides": overrides}


def _offline_settings() -> list[dict]:
    # Budget: 45 min * 0.8 / 40 runs ~ 50 s per run on 2 CPU cores. Measured inside the sweep
    # (2000-step MLPs 4-14 s, 1500-step CNN 13-19 s, 1000-step small Transformer 16-26 s), so
    # the lengths below should take ~15 min in all; the margin absorbs a loaded machine.
    return [
        _setting("mlp_mnist1d", {"num_steps": 3000}),
        _setting("mlp_digits", {"num_steps": 3000}),
        _setting("cnn_digits", {"num_steps": 2000}),
        # transformer_mnist1d (4 blocks) takes ~4 min alone: 1 block here.
        _setting(
            "transformer_mnist1d",
            {"num_steps": 2000, "batch_size": 64, "probe.size": 128, "model": _SMALL_TRANSFORMER},
        ),
    ]


def _quick_settings() -> list[dict]:
    tiny = {"num_steps": 200, "probe.size": 32, "model.hidden": (32, 32), "batch_size": 32}
    tiny |= {"record.snapshot_every_steps": 5, "log_every_steps": 50, "eval_every_steps": 20}
    tiny |= {"timescales.window": 9}
    return [_setting("mlp_mnist1d", tiny, "quick"), _setting("mlp_digits", tiny, "quick")]


def _full_settings() -> list[dict]:
    return [_setting(name, {}) for name in ("mlp_mnist", "cnn_mnist", "cnn_cifar10", "vit_cifar10")]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = variant(arg, ("quick", "full"))
    c = ml_collections.ConfigDict()
    c.optimizers = {
        "sgd": {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9},
        "adam": {"name": "adam", "learning_rate": 1e-3},
    }
    c.seeds = [0, 1, 2, 3, 4]
    c.overrides = dict(_OFFLINE)
    c.settings = _offline_settings()
    if arg == "quick":
        c.settings, c.seeds = _quick_settings(), [0, 1]
    elif arg == "full":
        c.settings = _full_settings()
        c.overrides = {"record": {"every_steps": 1}}
        c.optimizers.sgd.learning_rate = 0.02
    return c
