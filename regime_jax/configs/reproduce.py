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
  default 7 settings x 4 optimizers x 5 seeds, 140 runs: about 45 min of wall-clock
          (2026-11-24, three sittings sharing the machine with other jobs); the 40
          constant-rate runs of the 4 base settings alone: 11 min 45 s. Results (lag
          ratios with CIs, cosine and 3x rows, the curves, online vs offline T(flip)):
          README "Do patterns settle before weights?".
  :full   needs the tfds datasets and an accelerator; not run here (constant rates only).

Optimizers: "sgd" and "adam" keep the experiment's schedule (constant, except
transformer_mnist1d's own cosine with 200 warmup steps); "sgd_cosine" and "adam_cosine" are the
same peak rates decayed to 0 at num_steps. Settings: the 4 base ones, and "<setting>_long" (3x
num_steps) for the MLP and CNN ones. The report shows a row for each (setting, optimizer).
"""

import ml_collections

from regime_jax.configs.base import variant

# Shared by every offline run: flips every step, a 256-example probe, sparse host logging,
# mask snapshots every 10 steps (the per-unit flip raster needs consecutive snapshots).
_OFFLINE = {
    "record": {"every_steps": 1, "snapshot_every_steps": 10},
    "probe": {"size": 256},
    "log_every_steps": 200,
    "eval_every_steps": 200,
    # No intermediate checkpoints: these runs are short, so a killed one starts again from
    # step 0 (the sweep resumes from a checkpoint where one exists).
    "checkpoint": {"every_steps": 0},
}

_SMALL_TRANSFORMER = {"num_layers": 1, "dim": 32, "num_heads": 2, "mlp_dim": 64}


def _setting(name: str, overrides: dict, arg: str | None = None) -> dict:
    # experiment: a packaged config's name (regime_jax.configs), loaded by the sweep.
    return {"name": name, "experiment": name, "arg": arg, "overrides": overrides}


def _offline_settings() -> list[dict]:
    # Measured inside the sweep (2000-step MLPs 4-14 s, 1500-step CNN 13-19 s, 1000-step small
    # Transformer 16-26 s): the 40 constant-rate runs of these lengths take ~15 min; with the
    # cosine optimizers and the "_long" settings (get_config) the grid took ~45 min (EXPECTED).
    return [
        _setting("mlp_mnist1d", {"num_steps": 3000}),
        _setting("mlp_digits", {"num_steps": 3000}),
        _setting("cnn_digits", {"num_steps": 2000}),
        # transformer_mnist1d (4 blocks) takes ~4 min alone: 1 block here.
        _setting(
            "transformer_mnist1d",
            {"num_steps": 2000, "batch_size": 64, "probe.size": 128, "model": _SMALL_TRANSFORMER},
        ),
        # The same Transformer with a GELU FFN, its GELU signs recorded (opt-in): not yet
        # measured in this grid (EXPECTED above predates it).
        _setting(
            "transformer_gelu_mnist1d",
            {"num_steps": 2000, "batch_size": 64, "probe.size": 128, "model": _SMALL_TRANSFORMER},
        ),
    ]


def _long_settings(settings: list[dict]) -> list[dict]:
    # "<setting>_long": the MLP and CNN settings at 3x num_steps (does the lag grow with length?)
    out = []
    for setting in settings:
        if setting["name"].startswith(("mlp_", "cnn_")):
            longer = setting["overrides"] | {"num_steps": 3 * setting["overrides"]["num_steps"]}
            out.append(
                _setting(setting["experiment"], longer) | {"name": setting["name"] + "_long"}
            )
    return out


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
    constant = {
        "sgd": {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9},
        "adam": {"name": "adam", "learning_rate": 1e-3},
    }
    # cosine decay to 0 at num_steps, same peak rates: does a decaying rate change the lag?
    cosine = {f"{k}_cosine": v | {"schedule": "cosine"} for k, v in constant.items()}
    c.optimizers = constant | cosine
    c.seeds = [0, 1, 2, 3, 4]
    c.overrides = dict(_OFFLINE)
    c.settings = _offline_settings()
    c.settings += _long_settings(c.settings)
    if arg == "quick":
        c.settings, c.seeds, c.optimizers = _quick_settings(), [0, 1], constant
    elif arg == "full":
        c.settings, c.optimizers = _full_settings(), constant
        c.overrides = {"record": {"every_steps": 1}}
        c.optimizers.sgd.learning_rate = 0.02
    return c
