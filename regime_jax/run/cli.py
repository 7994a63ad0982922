"""Command-line pieces shared by ``regime_jax.main`` and ``regime_jax.sweep``.

``--config <name|file.py>[:arg]`` (``regime_jax.configs.load``) plus ``--config.<field>=<value>``
overrides (parsed here, not by absl's ``config_flags``, so that every mistake is one line),
absl flag parsing, ``--help`` detection and the exit: 0 / 1 / 2 (user error) / 3-6 (an
environment fault, :mod:`regime_jax.faults`) / 130 (SIGINT) / 143 (SIGTERM). This module
defines no flags; each program defines its own (``--config``, ``--workdir``, ...).
"""

from __future__ import annotations

import atexit
import logging as std_logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import flags, logging

from regime_jax import faults

HELP = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")
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


def wants_help(args: Sequence[str]) -> bool:
    return any(a in HELP for a in args)


def help_config(args: list[str], default: Callable[[], object], default_source: str):
    """The config ``--help`` describes: ``--config``'s config if given and loadable, else
    ``default()``; returns ``(config, where it came from)``."""
    from regime_jax import configs
    from regime_jax.configs.base import ConfigError

    spec = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if spec is None and "--config" in args[:-1]:
        spec = args[args.index("--config") + 1]
    source, config = default_source, default()
    if spec:
        try:
            config, source = configs.load(spec), spec
        except ConfigError as err:
            source += f"; {spec} could not be loaded: {err}"
    return config, source


def parse_flags(argv: list[str], required: Sequence[str]) -> list[tuple[str, str | None]]:
    """Parses ``argv`` into the absl flags; returns the ``--config.<field>`` overrides.

    Raises UsageError: an unknown flag, a positional argument, a missing ``required`` flag.
    """
    overrides, rest = split_overrides(argv[1:])
    flags.FLAGS.unparse_flags()  # a program's run() may be called more than once (tests)
    try:
        positional = flags.FLAGS([argv[0], *rest])[1:]
    except flags.Error as err:
        raise UsageError(str(err).splitlines()[0]) from None
    if positional:
        raise UsageError(f"unexpected arguments: {positional}")
    missing = [f"--{name}" for name in required if not flags.FLAGS[name].value]
    if missing:
        raise UsageError(f"{' and '.join(missing)} required; see --help")
    return overrides


def load_with_overrides(spec: str, overrides: list[tuple[str, str | None]], sweep: bool = False):
    """``configs.load(spec)`` with each ``--config.<field>`` override applied (ConfigError).

    ``sweep``: the program runs sweep configs (with ``settings``), else run configs; the other
    kind is refused in one line naming the program that runs it.
    """
    from regime_jax import configs
    from regime_jax.configs.base import ConfigError
    from regime_jax.configs.overrides import override

    config = configs.load(spec)
    if ("settings" in config) != sweep:
        kind, program = (
            ("a sweep config", "regime_jax.sweep")
            if "settings" in config
            else ("not a sweep config (it has no settings)", "regime_jax.main")
        )
        raise ConfigError(f"--config {spec} is {kind}: run it with python -m {program}")
    for field, value in overrides:
        override(config, field, value)
    return config


def quiet_logging() -> None:
    """Warnings only unless ``--verbosity`` was given: library INFO lines would bury progress."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def error_printer(prog: str) -> Callable[[str], None]:
    def err_line(text: str) -> None:
        if faults.debug() and sys.exc_info()[0] is not None:
            traceback.print_exc()
        print(f"{prog}: {text}", file=sys.stderr, flush=True)

    return err_line


_LIBRARY_NOISE = (f"{os.sep}orbax{os.sep}", f"{os.sep}asyncio{os.sep}", "tensorstore")


def _from_library(tb) -> bool:
    return any(
        any(part in frame.filename for part in _LIBRARY_NOISE) for frame in traceback.extract_tb(tb)
    )


_quieted: list[bool] = []


def quiet_library_noise() -> None:
    """Keeps what storage libraries print from their own threads off the terminal.

    orbax's writer threads log an error with a traceback and then re-raise it in the caller,
    which reports it in one line (:mod:`regime_jax.faults`); asyncio reports the same error
    again for each future nobody awaited. ``REGIME_JAX_DEBUG=1`` keeps all of it.
    """
    if faults.debug() or _quieted:
        return
    _quieted.append(True)
    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)

    def drop_orbax_errors(record: std_logging.LogRecord) -> bool:
        noisy = f"{os.sep}orbax{os.sep}" in record.pathname
        return not (noisy and record.levelno >= std_logging.ERROR)

    std_logging.getLogger("absl").addFilter(drop_orbax_errors)
    previous_thread_hook, previous_unraisable = threading.excepthook, sys.unraisablehook

    def thread_hook(args) -> None:
        if not _from_library(args.exc_traceback):
            previous_thread_hook(args)

    def unraisable(args) -> None:  # tensorstore's callbacks into a closed asyncio loop
        if not _from_library(args.exc_traceback):
            previous_unraisable(args)

    threading.excepthook, sys.unraisablehook = thread_hook, unraisable


def fault_exit(err: BaseException, err_line: Callable[[str], None], workdir) -> int | None:
    """Reports an environment fault behind ``err`` in one line and returns its exit code
    (:mod:`regime_jax.faults`); None if ``err`` is not one."""
    fault = faults.classify(err)
    if fault is None:
        return None
    err_line(faults.describe(fault, workdir))
    return fault.code


def run_and_exit(run: Callable[[list[str]], int]) -> NoReturn:
    """Runs a command's ``run(sys.argv) -> exit code`` and exits with that code."""
    try:
        code = run(sys.argv)
        sys.stdout.flush()
    except BrokenPipeError:  # output piped into a reader that quit (``--help | head``)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE, as a shell tool killed by it; records stay resumable
    exit_with(code)


def exit_with(code: int) -> NoReturn:
    """Exits without the interpreter's teardown, which restores the default signal handlers
    (a SIGINT then kills a finished run with no message) and lets library threads and
    unawaited futures print tracebacks; the exit handlers still run, under our handlers."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
