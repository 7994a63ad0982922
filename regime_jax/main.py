"""The only module with flags: ``python -m regime_jax.main --config <name>[:arg] --workdir <dir>``.

``<name>`` is a packaged config (``regime_jax.configs``: ``mlp_mnist1d``, ...) or a path to a
``.py`` file of your own with ``get_config(arg=None)``.

Any config field can be overridden with ``--config.<field>=<value>``, e.g.
``--config.optimizer.name=adam --config.num_steps=500``; ``--help`` lists every field with its
default and its one-line meaning (``--config <name> --help``: that config's fields). Running the
same command again on the same workdir resumes from the newest checkpoint.

The run ends with its result on stdout (:func:`result_block`): the final val accuracy, T(flip),
T(step) and the lag ratio from its ``summary.json`` (or why there is none), where the records
are, and the command that draws the run's figures. A stopped run says how far it got instead.

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

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
    from regime_jax.configs.overrides import describe, help_for

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
        f"config fields (--config.<field>=<default>  meaning) of {source}:\n"
        f"{describe(config, help_for(config))}\n"
    )


# ------------------------------------------------------------------ the result, on stdout

REPORT_COMMAND = "python -m regime_jax.report --run {workdir}"  # never imported: an import rule
_WHY = {  # a decay time's status (regime_jax.analysis.timescales.STATUSES), in words
    "never_settles": "had not settled when the run ended",
    "too_short": "has too few recorded points",
    "flat": "is constant",
    "nonfinite": "has NaN or inf values",
    "no_decay": "did not decay by the margin (timescales.min_drop, timescales.min_snr)",
    "still_decaying": "was still decaying when the run ended",
}


def _records(workdir: Path, summary: bool = True) -> str:
    """The workdir and the records in it (README "What a run writes")."""
    from regime_jax import records
    from regime_jax.run import checkpoint

    files = (records.METRICS, *([records.SUMMARY] if summary else []), records.CONFIG)
    folders = (records.MASKS_DIR, checkpoint.CHECKPOINTS, records.TB_DIR)
    present = [f for f in files if (workdir / f).is_file()]
    present += [f"{d}/" for d in folders if (workdir / d).is_dir()]
    return f"{workdir}: {', '.join(present)}" if present else str(workdir)


def _figures(workdir: Path) -> str:
    return REPORT_COMMAND.format(workdir=shlex.quote(str(workdir)))


def _decay(result: Mapping[str, Any], series: str) -> str:
    """``"120 steps (flip/all, settle rule)"`` or ``"none: did not settle ... (message)"``."""
    if result.get("time") is not None:
        return f"{result['time']:g} steps ({series} decay time, {result.get('rule')} rule)"
    status = result.get("status", "?")
    message = result.get("message")
    return f"none: {series} {_WHY.get(status, status)}" + (f" ({message})" if message else "")


def _lag(summary: Mapping[str, Any]) -> str:
    """The main rule's lag ratio, or why there is none; the other rules' where they give one."""
    from regime_jax.analysis.summary import PAPER_RATIO, main_ratio

    rule = summary["main_rule"]
    lag = summary["lag"]["abs"][rule]
    ratio = main_ratio(summary)
    others = [
        f"{r} {main_ratio(summary, rule=r):.2f}"
        for r in summary["lag"]["abs"]
        if r != rule and main_ratio(summary, rule=r) is not None
    ]
    if ratio is not None:
        text = f"{ratio:.2f} = T(step) / T(flip), {rule} rule (paper: {PAPER_RATIO}x)"
        return text + (f"; other rules: {', '.join(others)}" if others else "")
    why = lag["status"] if lag["status"] != "undefined" else lag.get("message") or "undefined"
    tail = f"; other rules: {', '.join(others)}" if others else ""
    return f"none under the {rule} rule ({why}){tail}"


def result_block(workdir: str | Path, summary: Mapping[str, Any] | None = None) -> str:
    """What a finished run prints last: its headline figures from ``summary.json``, where the
    records are and the command that draws its figures (``regime_jax.report``)."""
    import json

    from regime_jax import records

    workdir = Path(workdir)
    if summary is None:
        summary = json.loads((workdir / records.SUMMARY).read_text())
    acc = summary["final"].get("eval/acc")
    lag = summary["lag"]["abs"][summary["main_rule"]]
    lines = [
        f"done: {summary['last_step']} of {summary['num_steps']} steps",
        f"  val accuracy  {'none recorded' if acc is None else f'{acc:.3f} (final eval/acc)'}",
        f"  T(flip)       {_decay(lag['t_flip'], 'flip/all')}",
        f"  T(step)       {_decay(lag['t_step'], 'step/abs/all')}",
        f"  lag ratio     {_lag(summary)}",
    ]
    frozen = (summary.get("decouple") or {}).get("freeze_step")
    if frozen is not None:
        lines.append(f"  gates frozen  at step {frozen}")
    if summary.get("partial"):
        lines.append(f"  partial       {summary['partial']}")
    lines += [f"  records       {_records(workdir)}", f"  figures       {_figures(workdir)}"]
    return "\n".join(lines)


def stopped_block(workdir: str | Path, step: int, num_steps: int, why: str) -> str:
    """What a run stopped before its end prints last: how far it got, where the records are,
    how to resume, and the report command (its figures are marked partial)."""
    workdir = Path(workdir)
    return "\n".join(
        [
            f"partial: stopped at step {step} of {num_steps} ({why})",
            "  resume        run the same command again",
            f"  records       {_records(workdir, summary=False)} (summary.json: once complete)",
            f"  figures       {_figures(workdir)}   (of the steps so far, marked partial)",
        ]
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
    """Parses ``argv``, trains, prints the result (:func:`result_block`; a stopped run:
    :func:`stopped_block`) on stdout and returns the exit code; every failure is one stderr
    line."""
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
    workdir = config = None
    try:
        config, workdir = parse(argv)
        cli.quiet_logging()
        cli.quiet_library_noise()
        loop.train_and_evaluate(config, workdir)
        signals.completed("the run completed (summary.json written)")
        _print_result(workdir)
    except loop.NonFinite as err:
        err_line(f"stopped: {err}")
        return 1
    except loop.Interrupted as err:
        if _primary():
            why = f"{signals.name(err.signum)}, checkpoint saved"
            print(stopped_block(workdir, err.step, config.num_steps, why), flush=True)
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


def _primary() -> bool:
    """Whether this process wrote the records (the only one, unless ``--distributed``)."""
    from regime_jax.run import hosts

    return hosts.is_primary()


def _print_result(workdir) -> None:
    if _primary():
        print(result_block(workdir), flush=True)


def main() -> None:
    cli.run_and_exit(run)


if __name__ == "__main__":
    main()
