"""The only module with flags: ``python -m regime_jax.main --config <file>[:arg] --workdir <dir>``.

Any config field can be overridden with ``--config.<field>=<value>``, e.g.
``--config.optimizer.name=adam --config.num_steps=500``; ``--help`` lists every field with its
default (``--config <file> --help``: that file's fields). Running the same command again on
the same workdir resumes from the newest checkpoint.

Exit codes: 0 done, 1 non-finite loss or step size, 2 a user error (bad flag, field, value,
config file, data, workdir, or a workdir whose records do not match its checkpoints), 130
SIGINT, 143 SIGTERM (in the loop: after the step, with metrics flushed and a checkpoint saved).
Each is reported in one line, never a traceback.
"""

from __future__ import annotations

import os
import re
import sys

from regime_jax import signals

if __name__ == "__main__":
    signals.exit_on_signals()  # as early as possible: a signal during imports is a clean stop

from absl import flags, logging

_CONFIG = flags.DEFINE_string(
    "config", None, "Experiment config file, e.g. experiments/mlp_mnist1d.py[:quick]."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics and masks.")

PROG = "regime_jax"
_HELP = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")
_OVERRIDE = re.compile(r"^--?(no)?config\.([A-Za-z0-9_.]*)(?:=(.*))?$", re.DOTALL)
_NUMBER = re.compile(r"^-\d|^-\.\d|^-inf|^-nan", re.IGNORECASE)


class UsageError(Exception):
    """A bad command line (flag, field, value or config file): one line, exit 2."""


def split_overrides(args: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """``--config.<field>[=value]`` items (``--config.f value`` too) and the remaining args.

    ``--noconfig.<field>`` is ``false``; a repeated tuple field (``--config.model.hidden=8
    --config.model.hidden=8``) is joined into one comma-separated value.
    """
    overrides: dict[str, str | None] = {}
    counts: dict[str, int] = {}
    rest, i = [], 0
    while i < len(args):
        m = _OVERRIDE.match(args[i])
        if not m:
            rest.append(args[i])
            i += 1
            continue
        negated, field, value = m.groups()
        if negated:
            if value is not None:
                raise UsageError(f"--noconfig.{field} takes no value")
            value = "false"
        elif value is None and i + 1 < len(args):
            nxt = args[i + 1]
            if not nxt.startswith("-") or _NUMBER.match(nxt):
                value, i = nxt, i + 1
        counts[field] = counts.get(field, 0) + 1
        if counts[field] > 1 and field in overrides and value is not None:
            overrides[field] = f"{overrides.pop(field)},{value}"  # repeated: a tuple's items
        else:
            overrides.pop(field, None)
            overrides[field] = value  # later wins, and keeps the command line's order
        i += 1
    return list(overrides.items()), rest


def _help(args: list[str]) -> str:
    from regime_jax.config import ConfigError, base_config, describe, load_config

    spec = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if spec is None and "--config" in args[:-1]:
        spec = args[args.index("--config") + 1]
    source = "regime_jax.config.base_config() (the defaults every experiment starts from)"
    config = base_config()
    if spec:
        try:
            config, source = load_config(spec), spec
        except ConfigError as err:
            source += f"; {spec} could not be loaded: {err}"
    return (
        f"{__doc__}\n"
        f"usage: python -m regime_jax.main --config <file>[:arg] --workdir <dir> "
        f"[--config.<field>=<value> ...]\n\n"
        f"flags:\n  --config: {flags.FLAGS['config'].help}\n"
        f"  --workdir: {flags.FLAGS['workdir'].help}\n"
        f"  --verbosity: absl logging verbosity (default: warnings only)\n\n"
        f"config fields and their defaults in {source}:\n{describe(config)}\n"
    )


def parse(argv: list[str]):
    """argv -> (resolved, validated-later ConfigDict, workdir); UsageError / ConfigError."""
    from regime_jax.config import load_config, override

    overrides, rest = split_overrides(argv[1:])
    flags.FLAGS.unparse_flags()  # run() may be called more than once in a process (tests)
    try:
        positional = flags.FLAGS([argv[0], *rest])[1:]
    except flags.Error as err:
        raise UsageError(str(err).splitlines()[0]) from None
    if positional:
        raise UsageError(f"unexpected arguments: {positional}")
    missing = [f"--{f.name}" for f in (_CONFIG, _WORKDIR) if not f.value]
    if missing:
        raise UsageError(f"{' and '.join(missing)} required; see --help")
    config = load_config(_CONFIG.value)
    for field, value in overrides:
        override(config, field, value)
    return config, _WORKDIR.value


def run(argv: list[str]) -> int:
    """Parses ``argv``, trains, and returns the exit code; every outcome is one stderr line."""
    signals.exit_on_signals()  # until the loop takes over: a signal means "stop now"
    err_line = lambda text: print(f"{PROG}: {text}", file=sys.stderr, flush=True)
    if any(a in _HELP for a in argv[1:]):
        print(_help(argv[1:]))
        return 0
    from regime_jax import checkpoint, data, records, rundir, train
    from regime_jax.config import ConfigError

    user_errors = (
        UsageError,
        ConfigError,
        data.DatasetUnavailableError,
        checkpoint.CheckpointError,
        records.RecordError,
        rundir.WorkdirBusy,
        PermissionError,
        ValueError,
    )
    try:
        config, workdir = parse(argv)
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # library INFO lines would bury progress
        train.train_and_evaluate(config, workdir)
    except train.NonFinite as err:
        err_line(f"stopped: {err}")
        return 1
    except train.Interrupted as err:
        err_line(str(err))
        return err.exit_code
    except user_errors as err:
        err_line(f"error: {err}")
        return 2
    return 0


def main() -> None:
    try:
        code = run(sys.argv)
        sys.stdout.flush()
    except BrokenPipeError:  # output piped into a reader that quit (``--help | head``)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE, as a shell tool killed by it; records stay resumable
    sys.stderr.flush()
    if code in (signals.exit_code(s) for s in signals.SIGNALS):
        os._exit(code)  # skip interpreter teardown: no XLA thread can crash a stopped run
    sys.exit(code)


if __name__ == "__main__":
    main()
