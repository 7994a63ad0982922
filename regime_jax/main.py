"""The only module with flags: ``python -m regime_jax.main --config <name>[:arg] --workdir <dir>``.

``<name>`` is a packaged config (``regime_jax.configs``: ``mlp_mnist1d``, ...) or a path to a
``.py`` file of your own with ``get_config(arg=None)``.

Any config field can be overridden with ``--config.<field>=<value>``, e.g.
``--config.optimizer.name=adam --config.num_steps=500``; ``--help`` lists every field with its
default (``--config <name> --help``: that config's fields). Running the same command again on
the same workdir resumes from the newest checkpoint.

With ``--distributed`` this is one process of several, one per host (a TPU slice, a GPU
cluster): every process runs the same command and process 0 writes the records (README,
"Scale").

Exit codes: 0 done, 1 non-finite loss or step size, 2 a user error (bad flag, field, value,
config file, data, workdir, or a workdir whose records do not match its checkpoints), 3 disk
full, 4 the workdir vanished, 5 write permission lost, 6 another I/O error (README, "Resuming
and failures"), 130 SIGINT, 143 SIGTERM (in the loop: after the step, with metrics flushed and
a checkpoint saved; after the run completed: 0). Each is reported in one line, never a
traceback (``REGIME_JAX_DEBUG=1`` adds it).
"""

from __future__ import annotations

from regime_jax.run import signals

if __name__ == "__main__":
    signals.exit_on_signals()  # as early as possible: a signal during imports is a clean stop

from absl import flags

from regime_jax.run import cli
from regime_jax.run.cli import UsageError as UsageError  # re-exported: main.UsageError
from regime_jax.run.cli import split_overrides as split_overrides  # re-exported (tests, callers)

_CONFIG = flags.DEFINE_string(
    "config",
    None,
    "Experiment config: a packaged name, e.g. mlp_mnist1d[:quick], or a path/to/file.py[:arg].",
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics and masks.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "One process of several (one per host): calls jax.distributed.initialize() first; "
    "process 0 writes the records (README: Scale).",
)

PROG = "regime_jax"


def _help(args: list[str]) -> str:
    from regime_jax import configs
    from regime_jax.configs.base import base_config
    from regime_jax.configs.overrides import describe

    config, source = cli.help_config(
        args,
        base_config,
        "regime_jax.configs.base.base_config() (the defaults every experiment starts from)",
    )
    return (
        f"{__doc__}\n"
        f"usage: python -m regime_jax.main --config <name|file.py>[:arg] --workdir <dir> "
        f"[--config.<field>=<value> ...]\n\n"
        f"flags:\n  --config: {flags.FLAGS['config'].help}\n"
        f"  --workdir: {flags.FLAGS['workdir'].help}\n"
        f"  --distributed: {flags.FLAGS['distributed'].help}\n"
        f"  --verbosity: absl logging verbosity (default: warnings only)\n\n"
        f"packaged configs: {', '.join(configs.names())}\n\n"
        f"config fields and their defaults in {source}:\n{describe(config)}\n"
    )


def parse(argv: list[str]):
    """argv -> (resolved, validated-later ConfigDict, workdir); UsageError / ConfigError.

    With ``--distributed``, ``jax.distributed.initialize()`` runs here, before the config
    file (or anything else) can touch a device.
    """
    overrides = cli.parse_flags(argv, ("config", "workdir"))
    if _DISTRIBUTED.value:
        from regime_jax.run import hosts

        hosts.initialize()
    return cli.load_with_overrides(_CONFIG.value, overrides), _WORKDIR.value


def run(argv: list[str]) -> int:
    """Parses ``argv``, trains, and returns the exit code; every outcome is one stderr line."""
    signals.exit_on_signals()  # until the loop takes over: a signal means "stop now"
    err_line = cli.error_printer(PROG)
    if cli.wants_help(argv[1:]):
        print(_help(argv[1:]))
        return 0
    from regime_jax import data, records
    from regime_jax.configs.base import ConfigError
    from regime_jax.run import checkpoint, loop, rundir

    user_errors = (
        UsageError,
        ConfigError,
        data.DatasetUnavailableError,
        checkpoint.CheckpointError,
        records.RecordError,
        records.UnwritableWorkdir,
        rundir.WorkdirBusy,
    )
    workdir = None
    try:
        config, workdir = parse(argv)
        cli.quiet_logging()
        cli.quiet_library_noise()
        loop.train_and_evaluate(config, workdir)
        signals.completed("the run completed (summary.json written)")
    except loop.NonFinite as err:
        err_line(f"stopped: {err}")
        return 1
    except loop.Interrupted as err:
        err_line(str(err))
        return err.exit_code
    except user_errors as err:
        err_line(f"error: {err}")
        return 2
    except Exception as err:
        code = cli.fault_exit(err, err_line, workdir)
        if code is not None:
            return code
        if not isinstance(err, ValueError):
            raise  # a bug: its traceback is the report
        err_line(f"error: {err}")
        return 2
    return 0


def main() -> None:
    cli.run_and_exit(run)


if __name__ == "__main__":
    main()
