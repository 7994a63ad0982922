"""The only module with flags: ``python -m regime_jax.main --config <file>[:arg] --workdir <dir>``.

Any config field can be overridden with ``--config.<field>=<value>``, e.g.
``--config.optimizer.name=adam --config.num_steps=500``. Running the same command again on
the same workdir resumes from the newest checkpoint. Exit codes: 0 done, 1 non-finite loss or
parameters, 2 bad config / data / workdir, 130 interrupted (checkpoint saved).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from regime_jax import checkpoint, data, train
from regime_jax.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, e.g. experiments/mlp_mnist1d.py[:quick].",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics and masks.")
flags.mark_flags_as_required(["config", "workdir"])

_USER_ERRORS = (
    ConfigError,
    data.DatasetUnavailableError,
    checkpoint.CheckpointError,
    PermissionError,
    ValueError,
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # library INFO lines would bury the progress
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except FloatingPointError as err:
        sys.exit(
            f"regime_jax: stopped: {err}. Metrics up to there are in {_WORKDIR.value}; "
            f"the last good checkpoint is kept."
        )
    except train.Interrupted as err:
        print(f"regime_jax: {err}", file=sys.stderr)
        sys.exit(130)
    except _USER_ERRORS as err:
        print(f"regime_jax: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
