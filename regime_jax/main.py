"""The only module with flags: ``python -m regime_jax.main --config <file>[:arg] --workdir <dir>``.

Any config field can be overridden with ``--config.<field>=<value>``, e.g.
``--config.optimizer.name=adam --config.num_steps=500``.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from regime_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, e.g. experiments/mlp_mnist1d.py[:quick].",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics and masks.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
