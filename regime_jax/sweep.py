"""Runs a grid of settings x optimizers x seeds, then the report.

``python -m regime_jax.sweep --config reproduce[:arg] --workdir runs/reproduce``
takes ``--config.<field>=<value>`` overrides of the sweep config (e.g. ``--config.seeds=0,1``)
and reports every user error in one line, like ``regime_jax.main``.

The sweep config (a ConfigDict, see ``regime_jax/configs/reproduce.py``) has

* ``settings``: list of ``{name, experiment, arg, overrides}``; ``experiment`` names a packaged
  config (``mlp_mnist1d``) or a path to a ``.py`` file with ``get_config(arg)``, loaded like
  ``--config`` (``regime_jax.configs.load``); ``overrides`` maps config fields (dotted keys or
  nested dicts) to values. Optional ``optimizers``: ``{optimizer name: {field: value}}`` applied
  after the sweep-wide optimizer fields (e.g. a per-setting learning rate).
* ``optimizers``: ``{name: {field: value}}`` of ``optimizer.*`` fields.
* ``seeds``: list of ints; only ``config.seed`` changes (probe and dataset seeds stay fixed).
* ``overrides``: fields applied to every run.
* optional ``freeze`` (the decoupling experiment, :mod:`regime_jax.analysis.decoupling`):
  ``{multiples: [float], auto: bool, overrides: {field: value}}``. Each (setting, optimizer,
  seed) then runs as variants, in this order: ``never`` (ordinary training, the reference),
  ``auto`` (``decouple.auto``), and one per multiple m, frozen at
  ``decouple.freeze_step = round(m x T(flip))`` with T(flip) the ``never`` run's flip decay
  time under its main rule (read from its summary.json when the variant starts; a reference
  with no T(flip) fails the variant, naming why). ``overrides`` apply to the multiples' runs
  (e.g. a sparser record cadence). A variant's setting is named ``<setting>@<variant>``.

Composition order, later wins: experiment's ``get_config(arg)`` < sweep ``overrides`` <
setting ``overrides`` < ``optimizers[name]`` < setting ``optimizers[name]`` < seed. An
override must name an existing field. The whole grid is validated (``loop.check_config``) before
any run starts. Run ``k`` goes to ``<workdir>/<setting>/<optimizer>/seed_<k>/``; a run with
``summary.json`` is finished and skipped, any other run (re)starts afresh (``overwrite``).
``<workdir>/sweep.json`` holds the resolved grid. A run that raises is reported and the
sweep goes on; :func:`run_sweep` returns the failures.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from regime_jax.run import signals

if __name__ == "__main__":
    signals.exit_on_signals()  # as early as possible: a signal during imports is a clean stop

import ml_collections
from absl import flags

from regime_jax import configs, faults, records, report
from regime_jax.analysis import fmt, layout
from regime_jax.analysis.summary import SUMMARY, RunSummary
from regime_jax.configs import base
from regime_jax.configs.base import ConfigError
from regime_jax.configs.overrides import apply_overrides
from regime_jax.run import cli, loop

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Runs in one grid (before freeze variants): each is composed and validated up front and is
# a directory of checkpoints; 10**4 runs of even the quick configs take days.
RUNS_MAX = 10**4


def _is_map(value: Any) -> bool:
    return isinstance(value, (Mapping, ml_collections.ConfigDict))


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of the grid: where it goes and its resolved config."""

    setting: str
    optimizer: str
    seed: int
    config: ml_collections.ConfigDict
    multiple: float | None = None  # freeze at multiple x the reference's T(flip)
    reference: str | None = None  # path of the run whose T(flip) sets the freeze step

    @property
    def path(self) -> str:
        """The run's name in the sweep, ``<setting>/<optimizer>/seed_<k>`` (:mod:`layout
        <regime_jax.analysis.layout>`)."""
        return layout.name(self.setting, self.optimizer, self.seed)

    def rundir(self, workdir: str | Path) -> Path:
        """The run's directory in the sweep at ``workdir``."""
        return layout.path(workdir, self.setting, self.optimizer, self.seed)


def load_experiment(experiment: str | Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of a packaged config's name or a file's path (``configs.load``)."""
    return configs.load(str(experiment) if arg is None else f"{experiment}:{arg}")


def _check_names(sweep: ml_collections.ConfigDict) -> None:
    names = [s["name"] for s in sweep.settings] + list(sweep.optimizers)
    bad = [n for n in names if not isinstance(n, str) or not _NAME.match(n)]
    if not sweep.settings or not sweep.optimizers or not sweep.seeds:
        raise ConfigError("sweep needs non-empty settings, optimizers and seeds")
    if bad or len({s["name"] for s in sweep.settings}) < len(sweep.settings):
        raise ConfigError(f"setting/optimizer names must be unique path-safe words, got {bad}")
    if any(isinstance(k, bool) or not isinstance(k, int) for k in sweep.seeds):
        raise ConfigError(f"seeds must be ints, got {list(sweep.seeds)}")
    runs = len(sweep.settings) * len(sweep.optimizers) * len(sweep.seeds)
    if runs > RUNS_MAX:  # before a config is composed for each
        raise ConfigError(
            f"the grid has {runs} runs (settings x optimizers x seeds); allowed: at most {RUNS_MAX}"
        )


def _compose(sweep, setting: Mapping, opt: str, seed: int) -> ml_collections.ConfigDict:
    where = f"setting {setting['name']!r} (optimizer {opt!r}, seed {seed})"
    try:
        config = load_experiment(setting["experiment"], setting.get("arg"))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err
    apply_overrides(config, sweep.get("overrides"), f"{where}, sweep overrides")
    apply_overrides(config, setting.get("overrides"), f"{where}, setting overrides")
    apply_overrides(config.optimizer, sweep.optimizers[opt], f"{where}, optimizer {opt!r}")
    per_setting = (setting.get("optimizers") or {}).get(opt)
    apply_overrides(config.optimizer, per_setting, f"{where}, setting optimizer {opt!r}")
    config.seed, config.overwrite = int(seed), True
    return config


def expand_grid(sweep: ml_collections.ConfigDict) -> list[RunSpec]:
    """Every (setting, optimizer, seed) with its composed config, validated before returning.

    Raises:
      ConfigError naming the setting, optimizer, seed and field of the first bad run.
    """
    _check_names(sweep)
    specs = []
    for setting in sweep.settings:
        for opt in sweep.optimizers:
            for seed in sweep.seeds:
                config = _compose(sweep, setting, opt, seed)
                try:
                    loop.check_config(config)
                except ConfigError as err:
                    where = f"setting {setting['name']!r} (optimizer {opt!r}, seed {seed})"
                    raise ConfigError(f"{where}: {err}") from err
                spec = RunSpec(setting["name"], opt, int(seed), config)
                specs += _variants(sweep, spec) if sweep.get("freeze") else [spec]
    return specs


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A deep copy a variant can change without touching the run it came from."""
    return ml_collections.ConfigDict(config.to_dict())


def _variants(sweep, spec: RunSpec) -> list[RunSpec]:
    """The decoupling variants of one run (see the module doc), validated."""
    from regime_jax.analysis.decoupling import AUTO, NEVER, SEP, variant_name

    freeze = sweep.freeze
    name = lambda v: f"{spec.setting}{SEP}{v}"
    never = dataclasses.replace(spec, setting=name(NEVER))
    out = [never]
    if freeze.get("auto", False):
        config = _copy(spec.config)
        config.decouple.auto = True
        out.append(dataclasses.replace(spec, setting=name(AUTO), config=config))
    for m in freeze.get("multiples", ()):
        if isinstance(m, bool) or not isinstance(m, int | float) or not m >= 0:
            raise ConfigError(f"freeze.multiples: {m!r} is not a number >= 0")
        config = _copy(spec.config)
        where = f"setting {spec.setting!r} (optimizer {spec.optimizer!r}), freeze.overrides"
        apply_overrides(config, freeze.get("overrides"), where)
        config.decouple.freeze_step = 0  # validated now, set from the reference when it runs
        try:
            loop.check_config(config)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err
        variant = dataclasses.replace(
            spec, setting=name(variant_name(m)), config=config, multiple=float(m)
        )
        out.append(dataclasses.replace(variant, reference=never.path))
    return out


def _resolve(spec: RunSpec, workdir: Path) -> tuple[RunSpec, str]:
    """A multiple's run with its freeze step from the reference's T(flip), and a note.

    T(flip) is the reference's flip decay time under ``decoupling.FREEZE_RULE``: its main
    rule, else the first other rule that gives one (the note says which); ValueError if no
    rule does.
    """
    from regime_jax.analysis.decoupling import FREEZE_RULE

    if spec.multiple is None:
        return spec, ""
    reference = Path(workdir) / spec.reference
    if not (reference / SUMMARY).exists():
        raise ValueError(f"the reference run {spec.reference} did not finish (no {SUMMARY})")
    summary = RunSummary.load(reference)
    t_flip = summary.t_flip(FREEZE_RULE)
    if t_flip.time is None:
        why = t_flip.message or t_flip.status
        raise ValueError(f"the reference run {spec.reference} has no T(flip) under any rule: {why}")
    config = _copy(spec.config)
    config.decouple.freeze_step = round(spec.multiple * float(t_flip.time))
    main = summary.main_rule
    note = "" if t_flip.rule == main else f" | T(flip) from the {t_flip.rule} rule ({main}: none)"
    return dataclasses.replace(spec, config=config), note


# The deepest file a run writes below its directory, with room to spare: orbax's
# "checkpoints/<step>.orbax-checkpoint-tmp-<n>/default/ocdbt.process_0/d/<32 hex>", and
# "broken_checkpoints/<step>/...".
RUN_FILES_RESERVE = 200


def _limit(existing: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(existing, name)
    except (OSError, ValueError, AttributeError):  # not on this OS / file system
        return default


def check_paths(workdir: str | Path, specs: list[RunSpec]) -> None:
    """ConfigError unless every run's directory, and the files a run writes in it, fit the
    file system's limits on a name (``NAME_MAX``, usually 255 bytes) and on a path
    (``PATH_MAX``); checked before anything is created or written, ``sweep.json`` included.
    """
    base = Path(os.path.abspath(workdir))
    existing = next(p for p in (base, *base.parents) if p.exists())
    name_max = _limit(existing, "PC_NAME_MAX", 255)
    path_max = _limit(existing, "PC_PATH_MAX", 4096)
    for part in base.parts[1:]:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(
                f"--workdir: the folder name {_short(part)} is longer than the file system "
                f"allows ({name_max} bytes)"
            )
    what = ("setting", "optimizer", "seed")
    for spec in specs:
        for kind, part in zip(what, spec.path.split("/"), strict=True):
            size = len(os.fsencode(part))
            if size > name_max:
                raise ConfigError(
                    f"{kind} name {_short(part)} is {size} bytes, longer than the file system "
                    f"allows for a folder name ({name_max} bytes): use a shorter {kind} name"
                )
        size = len(os.fsencode(str(base / spec.path))) + RUN_FILES_RESERVE
        if size > path_max:
            raise ConfigError(
                f"run folder {_short(str(base / spec.path))} is too deep: with the files a run "
                f"writes in it ({RUN_FILES_RESERVE} bytes) its paths pass the file system's "
                f"limit of {path_max} bytes: use a shorter --workdir or setting name"
            )


def _short(name: str, keep: int = 40) -> str:
    return repr(name if len(name) <= keep else f"{name[:keep]}...")


def _write_grid(workdir: Path, sweep, specs: list[RunSpec]) -> None:
    grid = {
        "sweep": sweep.to_dict(),
        "runs": [
            {"path": s.path, "setting": s.setting, "optimizer": s.optimizer, "seed": s.seed}
            | ({} if s.multiple is None else {"multiple": s.multiple, "reference": s.reference})
            | {"config": s.config.to_dict()}
            for s in specs
        ],
    }
    text = records.to_json(grid, indent=1, default=str) + "\n"
    records.write_atomic(workdir / layout.GRID, text)


def _run_one(spec: RunSpec, workdir: Path) -> str:
    """Trains one run (train writes its summary.json) and returns a progress line."""
    tic = time.perf_counter()
    spec, note = _resolve(spec, workdir)
    rundir = spec.rundir(workdir)
    loop.train_and_evaluate(spec.config, rundir)
    summary = RunSummary.load(rundir)
    lag = summary.lag()
    acc_text = fmt.num(summary.final_acc, ".3f")
    lag_text = fmt.num(lag.ratio) if lag.ratio is not None else lag.status
    frozen = summary.freeze_step
    tail = ("" if frozen is None else f" | frozen at step {frozen}") + note
    return (
        f"{time.perf_counter() - tic:.1f} s | eval/acc {acc_text} | lag ratio (abs) {lag_text}"
        + tail
    )


def _changed(spec: RunSpec, workdir: Path, rundir: Path) -> str | None:
    """Why the finished run in ``rundir`` is not ``spec``'s run (None: it is, reuse it).

    Compares the run's recorded fingerprint (``fingerprint.json``; for a run from before
    fingerprints, ``config.json``) with ``spec``'s resolved config, and the run's
    ``config.json`` with its fingerprint (a hand edit).
    """
    from regime_jax.run import fingerprint

    try:
        spec, _ = _resolve(spec, workdir)
    except (ValueError, KeyError, OSError) as err:
        return f"its freeze step cannot be resolved ({err})"
    try:
        stored = records.read_json(rundir / records.CONFIG)
        recorded = fingerprint.read(rundir)
    except (OSError, ValueError) as err:  # RecordError is a ValueError
        return f"its {records.CONFIG} / {fingerprint.FILE} do not read ({type(err).__name__})"
    config = spec.config.to_dict()
    if recorded is None:
        diff = records.config_diff(stored, config, loop.RESUME_IGNORES, base.ADDED_FIELDS)
        return f"its config differs in {diff}" if diff else None
    current = fingerprint.make(config, None, loop.RESUME_IGNORES)
    edited = records.config_diff(recorded["config"], stored, loop.RESUME_IGNORES)
    if edited:
        return f"its {records.CONFIG} was edited ({edited})"
    diff = fingerprint.diff(recorded, current)
    if not diff:
        return None
    return f"its settings differ in {fingerprint.describe(diff, recorded, current)}"


def run_sweep(
    sweep: ml_collections.ConfigDict,
    workdir: str | Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Validates the grid, runs every unfinished run in order, then builds the report.

    Returns:
      ``{"ran": [paths], "skipped": [paths], "failed": {path: error}, "report": build_report}``.
    """
    specs = expand_grid(sweep)
    workdir = Path(workdir)
    check_paths(workdir, specs)  # before the first write
    workdir.mkdir(parents=True, exist_ok=True)
    _write_grid(workdir, sweep, specs)
    ran, skipped, failed = [], [], {}
    for i, spec in enumerate(specs, start=1):
        rundir = spec.rundir(workdir)
        head = f"[{i}/{len(specs)}] {rundir}"
        changed = _changed(spec, workdir, rundir) if (rundir / SUMMARY).exists() else ""
        if changed is None:
            skipped.append(spec.path)
            log(f"{head} | finished before, skipped")
            continue
        if changed:  # never labels the old run's results with the new settings
            log(f"{head} | finished before, but {changed}: running it afresh")
        try:
            log(f"{head} | {_run_one(spec, workdir)}")
            ran.append(spec.path)
        except loop.Interrupted as err:  # SIGINT / SIGTERM: the run saved its checkpoint
            err.sweep_run = spec.path
            stopped = f"STOPPED by {signals.name(err.signum)} at step {err.step}"
            log(f"{head} | {stopped}, checkpoint saved")
            raise  # a KeyboardInterrupt: the sweep stops here, finished runs are kept
        except Exception as err:  # one failed run must not lose the rest of the grid
            if faults.classify(err):  # ... but a full disk fails every run after it
                err.sweep_run = spec.path
                raise
            failed[spec.path] = f"{type(err).__name__}: {err}"
            log(f"{head} | FAILED {failed[spec.path]}")
    result = report.build_report(workdir)
    log(result["table"])
    log(f"report: {result['report']}")
    return {"ran": ran, "skipped": skipped, "failed": failed, "report": result}


def enable_compilation_cache(directory: str | Path) -> None:
    """JAX persistent compilation cache: seeds of one setting share their compiled steps.

    Every run re-jits its step functions; with the cache, runs that differ only in the seed
    load the executables from disk instead of compiling again. An already configured cache
    (``JAX_COMPILATION_CACHE_DIR``) is kept.
    """
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


PROG = "regime_jax.sweep"
REPRODUCE = "reproduce"  # the packaged sweep config --help describes by default


# The sweep config's own fields (the module doc has the details); the fields they set in each
# run (optimizers.<name>.*, overrides.*) take their meaning from base_config's comments.
SWEEP_FIELDS = {
    "settings": "the grid's rows: {name, experiment, arg, overrides} each (module doc)",
    "seeds": "the seeds of every (setting, optimizer); only config.seed changes",
    "optimizers": "the grid's columns: {name: optimizer.* fields}",
    "overrides": "config fields set in every run (dotted or nested)",
    "freeze": "the decoupling variants of every run (regime_jax.analysis.decoupling)",
    "freeze.multiples": "freeze at these multiples of the never-frozen run's T(flip)",
    "freeze.auto": "also a variant frozen by the online settle detector (decouple.auto)",
    "freeze.overrides": "config fields set in the frozen-at-a-multiple variants",
}
_SETS_RUN_FIELDS = {"overrides": "every run", "freeze.overrides": "frozen variants"}


def field_help(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Each sweep config field's one-line meaning (:data:`SWEEP_FIELDS`, and the run config
    field it sets: :func:`regime_jax.configs.overrides.field_help`)."""
    from regime_jax.configs.overrides import field_help as run_help
    from regime_jax.configs.overrides import fields

    runs, out = run_help(), dict(SWEEP_FIELDS)
    for name, _ in fields(config):
        if name.startswith("optimizers."):
            _, opt, field = name.split(".", 2)
            out[f"optimizers.{opt}"] = f"the optimizer column {opt!r}"
            out.setdefault(name, f"{opt}: {runs.get('optimizer.' + field, '')}".rstrip(": "))
        for prefix, who in _SETS_RUN_FIELDS.items():
            if name.startswith(prefix + ".") and name not in out:
                field = name.removeprefix(prefix + ".")
                out[name] = f"{who}: {runs[field]}" if runs.get(field) else ""
    return {k: v for k, v in out.items() if v}


def _help(args: list[str]) -> str:
    from regime_jax.configs.overrides import describe

    config, source = cli.help_config(args, lambda: configs.load(REPRODUCE), REPRODUCE)
    described = describe(config, field_help(config))
    return (
        f"{__doc__}\n"
        f"usage: python -m regime_jax.sweep --config <name|file.py>[:arg] --workdir <dir>\n"
        f"         [--[no]compilation_cache] [--config.<field>=<value> ...]\n\n"
        f"Overrides and errors work as in regime_jax.main: a field typo, a value of the\n"
        f"wrong type, an unknown config or an unknown :arg is one line and exit code 2.\n"
        f"Exit codes: 0 every run finished, 1 some run failed (the others still ran), 2 a\n"
        f"user error, 130 SIGINT, 143 SIGTERM (the current run stops after its step with a\n"
        f"checkpoint; finished runs are skipped when the same command is run again).\n\n"
        f"flags:\n  --config: {flags.FLAGS['config'].help}\n"
        f"  --workdir: {flags.FLAGS['workdir'].help}\n"
        f"  --[no]compilation_cache: {flags.FLAGS['compilation_cache'].help} (default: true)\n"
        f"  --verbosity: absl logging verbosity (default: warnings only)\n\n"
        f"sweep config fields (--config.<field>=<default>  meaning) of {source}:\n{described}\n"
    )


def run(argv: list[str]) -> int:
    """Parses ``argv`` like ``regime_jax.main.run``, runs the sweep, returns the exit code."""
    signals.exit_on_signals()  # train's loop takes over per step; between runs: stop now
    err_line = cli.error_printer(PROG)
    if cli.wants_help(argv[1:]):
        print(_help(argv[1:]))
        return 0
    workdir = None
    try:
        overrides = cli.parse_flags(argv, ("config", "workdir"))
        sweep = cli.load_with_overrides(flags.FLAGS.config, overrides, sweep=True)
        cli.quiet_logging()  # keep one line per run readable
        cli.quiet_library_noise()
        workdir = Path(flags.FLAGS.workdir)
        if flags.FLAGS.compilation_cache:
            enable_compilation_cache(workdir / ".jax_cache")
        result = run_sweep(sweep, workdir)
        signals.completed("the sweep completed (report written)")
    except loop.Interrupted as err:
        run_path = getattr(err, "sweep_run", "?")
        err_line(
            f"{run_path}: {signals.name(err.signum)}: stopped at step {err.step} with a "
            f"checkpoint; finished runs are kept and skipped when the same command is run again"
        )
        return err.exit_code
    except (cli.UsageError, ConfigError, records.RecordError, records.UnwritableWorkdir) as err:
        err_line(f"error: {(str(err).splitlines() or [type(err).__name__])[0]}")
        return 2
    except (OSError, ValueError) as err:
        where = getattr(err, "sweep_run", None)
        code = cli.fault_exit(err, err_line, workdir / where if where else None)
        if code is not None:
            return code
        err_line(f"error: {(str(err).splitlines() or [type(err).__name__])[0]}")
        return 2
    if result["failed"]:
        err_line(f"{len(result['failed'])} run(s) failed: {sorted(result['failed'])}")
        return 1
    return 0


def _define_flags() -> None:
    """Flags exist only when run as a script (regime_jax.main defines the same names)."""
    help_text = "Sweep config: a packaged name, e.g. reproduce[:quick], or a path/to/file.py[:arg]."
    flags.DEFINE_string("config", None, help_text)
    flags.DEFINE_string("workdir", None, "Directory for the runs, summary and report.")
    flags.DEFINE_bool("compilation_cache", True, "Cache compiled steps in <workdir>/.jax_cache.")


def main() -> None:
    _define_flags()
    cli.run_and_exit(run)


if __name__ == "__main__":
    main()
