"""Runs a grid of settings x optimizers x seeds, then the report.

``python -m regime_jax.sweep --config reproduce[:arg] --workdir runs/reproduce``
takes ``--config.<field>=<value>`` overrides of the sweep config (e.g. ``--config.seeds=0,1``)
and reports every user error in one line, like ``regime_jax.main``.

The sweep config (a ConfigDict, see ``regime_jax/configs/reproduce.py``) has

* ``settings``: list of ``{name, experiment, arg, overrides}``; ``experiment`` names a packaged
  config (``mlp_mnist1d``) or a path to a ``.py`` file with ``get_config(arg)``, loaded like
  ``--config`` (``regime_jax.configs.load``); ``overrides`` maps config fields (dotted keys or
  nested dicts) to values. Optional ``optimizers``: ``{optimizer name: {field: value}}`` applied
  after the sweep-wide optimizer fields (e.g. a per-setting learning rate). Optional
  ``optimizers_only``: a list of optimizer names, the only columns this setting runs
  (default: every one); optional ``max_seeds``: this setting runs the first N of the sweep's
  seeds only (a costly setting).
  Optional ``axis`` and ``value`` place the setting on a lag map (``regime_jax/configs/
  lag_map.py``, the report's "Lag map"): an axis name and the setting's value on it, or
  lists of both for a base setting that lies on several axes.
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
``summary.json`` whose fingerprint matches is finished and skipped; an unfinished run of the
same settings (a killed sweep) is resumed from its newest checkpoint; any other run starts
afresh (``overwrite``). ``<workdir>/sweep.json`` holds the resolved grid. A run that raises is
reported and the sweep goes on; :func:`run_sweep` returns the failures.

Many workers (docs/guide/scale.md, "Sweeps over many workers"): ``--workers N`` starts N
processes on this machine; ``--task_index I --num_tasks N`` (or a SLURM job array's
``SLURM_ARRAY_TASK_ID`` / ``SLURM_ARRAY_TASK_COUNT``) makes this process task I of N started
separately on a shared file system. The grid is cut into units (a (setting, optimizer, seed)
with its freeze variants, in grid order); task I owns the units ``u`` with ``u % N == I``,
runs them first, then takes units nobody has started (from the end of the grid). Each run is
decided and trained under its workdir lock (``run/rundir.py``): a run held by a live process
is left to it, so no run trains twice at once and a finished one is never redone. Every task
writes the same ``sweep.json`` (a task joining running tasks with another grid is refused);
the task that ends last builds the report.
"""

from __future__ import annotations

import dataclasses
import fcntl
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
from regime_jax.analysis import fmt, lagmap, layout
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


def _bad_seeds(seeds: Any) -> bool:
    if isinstance(seeds, str) or not isinstance(seeds, list | tuple) or not seeds:
        return True
    return any(isinstance(k, bool) or not isinstance(k, int) for k in seeds)


def setting_optimizers(sweep: ml_collections.ConfigDict, setting: Mapping) -> list[str]:
    """The optimizer columns ``setting`` runs: its ``optimizers_only`` (in the sweep's column
    order), else every one; ConfigError in one line for a name that is not a column."""
    only = setting.get("optimizers_only")
    if only is None:
        return list(sweep.optimizers)
    if isinstance(only, str) or not isinstance(only, list | tuple) or not only:
        raise ConfigError(
            f"setting {setting['name']!r}: optimizers_only={only!r}; allowed: a non-empty list "
            f"of the optimizer names {list(sweep.optimizers)}"
        )
    unknown = [o for o in only if o not in sweep.optimizers]
    if unknown:
        raise ConfigError(
            f"setting {setting['name']!r}: optimizers_only names {unknown}, not optimizer "
            f"columns; allowed: {list(sweep.optimizers)}"
        )
    return [o for o in sweep.optimizers if o in only]


def setting_seeds(sweep: ml_collections.ConfigDict, setting: Mapping) -> list[int]:
    """The seeds ``setting`` runs: the sweep's, or their first ``max_seeds`` where it says so
    (a costly setting with fewer seeds, still following ``--config.seeds``)."""
    if "seeds" in setting:
        raise ConfigError(
            f"setting {setting['name']!r}: a setting has no seeds of its own (the sweep's "
            f"seeds are every setting's); allowed: max_seeds=N, the first N of them"
        )
    most = setting.get("max_seeds")
    if most is None:
        return list(sweep.seeds)
    if isinstance(most, bool) or not isinstance(most, int) or most < 1:
        raise ConfigError(
            f"setting {setting['name']!r}: max_seeds={most!r}; allowed: an int >= 1 (the "
            f"first max_seeds of the sweep's seeds)"
        )
    return list(sweep.seeds)[:most]


def _check_names(sweep: ml_collections.ConfigDict) -> None:
    names = [s["name"] for s in sweep.settings] + list(sweep.optimizers)
    bad = [n for n in names if not isinstance(n, str) or not _NAME.match(n)]
    if not sweep.settings or not sweep.optimizers or not sweep.seeds:
        raise ConfigError("sweep needs non-empty settings, optimizers and seeds")
    if bad or len({s["name"] for s in sweep.settings}) < len(sweep.settings):
        raise ConfigError(f"setting/optimizer names must be unique path-safe words, got {bad}")
    if _bad_seeds(list(sweep.seeds)):
        raise ConfigError(f"seeds must be ints, got {list(sweep.seeds)}")
    for setting in sweep.settings:  # a lag map's axis and value lists pair up
        try:
            lagmap.placements(setting)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    runs = sum(
        len(setting_optimizers(sweep, s)) * len(setting_seeds(sweep, s)) for s in sweep.settings
    )
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
        for opt in setting_optimizers(sweep, setting):
            for seed in setting_seeds(sweep, setting):
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


def _grid_text(sweep, specs: list[RunSpec]) -> str:
    grid = {
        "sweep": sweep.to_dict(),
        "runs": [
            {"path": s.path, "setting": s.setting, "optimizer": s.optimizer, "seed": s.seed}
            | ({} if s.multiple is None else {"multiple": s.multiple, "reference": s.reference})
            | {"config": s.config.to_dict()}
            for s in specs
        ],
    }
    return records.to_json(grid, indent=1, default=str) + "\n"


# ------------------------------------------------------------------ tasks: who runs what

MEMBERS = ".sweep.lock"  # every task of a sweep holds it shared while it runs


class SweepConflict(ConfigError):
    """A task of the same workdir, still running, was started with another sweep config."""


@dataclasses.dataclass(frozen=True)
class Task:
    """This process's share of the grid: task ``index`` of ``count`` (module doc)."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ConfigError(f"--num_tasks={self.count!r}: allowed: an integer >= 1")
        if not isinstance(self.index, int) or not 0 <= self.index < self.count:
            raise ConfigError(
                f"--task_index={self.index!r} with --num_tasks={self.count}: allowed: "
                f"0 to {self.count - 1}"
            )

    def owns(self, unit: int) -> bool:
        return unit % self.count == self.index


def units(specs: list[RunSpec]) -> list[list[RunSpec]]:
    """The grid in units of assignment, in grid order: one (setting, optimizer, seed) each,
    with its freeze variants (a frozen variant needs its reference's T(flip), so a unit's
    runs go in order, in one task)."""
    from regime_jax.analysis.decoupling import SEP  # setting names cannot hold it

    out: list[list[RunSpec]] = []
    key = lambda s: (s.setting.split(SEP)[0], s.optimizer, s.seed)
    for spec in specs:
        if out and key(out[-1][0]) == key(spec):
            out[-1].append(spec)
        else:
            out.append([spec])
    return out


class _Members:
    """``<workdir>/.sweep.lock``, held shared by every task while it runs.

    A task that finds nobody else there writes ``sweep.json``; one that joins running tasks
    checks that its grid is theirs (:class:`SweepConflict` otherwise). At the end, the task
    that finds itself the last one holding it builds the report.
    """

    def __init__(self, workdir: Path, text: str):
        self.fd = os.open(workdir / MEMBERS, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._join(workdir / layout.GRID, text)
        except BaseException:
            os.close(self.fd)
            raise

    def _join(self, grid: Path, text: str) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        except OSError:  # no flock on this file system: every task writes the same file
            alone = None
        if alone is not False:
            if not grid.exists() or grid.read_text() != text:
                records.write_atomic(grid, text)
            if alone:
                fcntl.flock(self.fd, fcntl.LOCK_SH)
            return
        fcntl.flock(self.fd, fcntl.LOCK_SH)  # waits while a starting task writes the grid
        try:
            theirs = grid.read_text()
        except FileNotFoundError:
            records.write_atomic(grid, text)
            return
        if theirs != text:
            import json

            diff = records.config_diff(json.loads(theirs), json.loads(text))
            raise SweepConflict(
                f"another task of this sweep is running on {grid.parent} with a different "
                f"sweep config ({layout.GRID} differs in {diff[:4]}); every task must be "
                f"given the same --config and overrides: stop them or use another --workdir"
            )

    def last(self) -> bool:
        """Leaves; True if no other task holds the lock now (this one then keeps it)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        os.close(self.fd)


def _run_one(spec: RunSpec, workdir: Path, resume: bool) -> str:
    """Trains one run (train writes its summary.json) and returns a progress line."""
    tic = time.perf_counter()
    spec, note = _resolve(spec, workdir)
    rundir = spec.rundir(workdir)
    config = spec.config
    if resume:  # the same run, killed before it finished: continue it
        config = _copy(config)
        config.overwrite = False
    loop.train_and_evaluate(config, rundir)
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
    """Why the (finished or partial) run in ``rundir`` is not ``spec``'s run (None: it is).

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


BUSY = "busy"  # _process: another live process holds the run's lock


def _process(spec: RunSpec, workdir: Path, head: str, out: dict, log) -> str:
    """Runs, resumes or skips one run under its lock; returns what happened (a key of out)."""
    from regime_jax.run import rundir as rundirs

    rundir = spec.rundir(workdir)
    try:
        with rundirs.lock(rundir):  # decided and trained under one lock: never twice
            finished = (rundir / SUMMARY).exists()
            changed = _changed(spec, workdir, rundir) if finished else ""
            if changed is None:
                out["skipped"].append(spec.path)
                log(f"{head} | finished before, skipped")
                return "skipped"
            if changed:  # never labels the old run's results with the new settings
                log(f"{head} | finished before, but {changed}: running it afresh")
            partial = not finished and rundirs.holds_run(rundir)
            resume = partial and _changed(spec, workdir, rundir) is None
            try:
                log(f"{head} | {_run_one(spec, workdir, resume)}")
            except ConfigError as err:
                if not resume:
                    raise
                log(f"{head} | cannot resume ({err}): running it afresh")
                log(f"{head} | {_run_one(spec, workdir, False)}")
            out["ran"].append(spec.path)
            return "ran"
    except rundirs.WorkdirBusy as err:
        holder = re.search(r"in use by (.*?) \(", str(err))
        log(f"{head} | held by {holder.group(1) if holder else 'another process'}, left to it")
        out[BUSY].append(spec.path)
        return BUSY
    except loop.Interrupted as err:  # SIGINT / SIGTERM: the run saved its checkpoint
        err.sweep_run = spec.path
        stopped = f"STOPPED by {signals.name(err.signum)} at step {err.step}"
        log(f"{head} | {stopped}, checkpoint saved")
        raise  # a KeyboardInterrupt: the sweep stops here, finished runs are kept
    except Exception as err:  # one failed run must not lose the rest of the grid
        if faults.classify(err):  # ... but a full disk fails every run after it
            err.sweep_run = spec.path
            raise
        out["failed"][spec.path] = f"{type(err).__name__}: {err}"
        log(f"{head} | FAILED {out['failed'][spec.path]}")
        return "failed"


def _unclaimed(rundir: Path) -> bool:
    """Claims a run nobody has started (its directory does not exist yet): True if this call
    created the directory (``mkdir`` is atomic, also on a shared file system)."""
    rundir.parent.mkdir(parents=True, exist_ok=True)
    try:
        rundir.mkdir()
        return True
    except FileExistsError:
        return False


def run_sweep(
    sweep: ml_collections.ConfigDict,
    workdir: str | Path,
    log: Callable[[str], None] = print,
    task: Task = Task(),
) -> dict[str, Any]:
    """Validates the grid, runs this task's unfinished runs in order, then builds the report.

    ``task``: this process's share (module doc, "Many workers"): its own units first, then
    units of other tasks that nobody has started. The report is built by the task that finds
    itself the last one running (a single process always is).

    Returns:
      ``{"ran": [paths], "skipped": [paths], "busy": [paths], "failed": {path: error},
      "report": build_report or None}``: ``busy`` runs were held by another live process.
    """
    specs = expand_grid(sweep)
    workdir = Path(workdir)
    check_paths(workdir, specs)  # before the first write
    text = _grid_text(sweep, specs)
    workdir.mkdir(parents=True, exist_ok=True)
    members = _Members(workdir, text)
    out: dict[str, Any] = {"ran": [], "skipped": [], BUSY: [], "failed": {}, "report": None}
    try:
        position = {spec.path: i for i, spec in enumerate(specs, start=1)}
        head = lambda spec: f"[{position[spec.path]}/{len(specs)}] {spec.rundir(workdir)}"
        grid = units(specs)
        for k, unit in enumerate(grid):
            if not task.owns(k):
                continue
            for spec in unit:  # a busy run's unit is another process's: its variants follow it
                if _process(spec, workdir, head(spec), out, log) == BUSY:
                    break
        for k in reversed(range(len(grid))):  # steal from the end, where owners arrive last
            unit = grid[k]
            if task.owns(k) or not _unclaimed(unit[0].rundir(workdir)):
                continue
            log(f"{head(unit[0])} | task {k % task.count}'s, not started: taken by {task.index}")
            for spec in unit:
                if _process(spec, workdir, head(spec), out, log) == BUSY:
                    break
        if members.last():
            out["report"] = result = report.build_report(workdir)
            log(result["table"])
            log(f"report: {result['report']}")
        else:
            log(
                f"report: left to the last task still running on {workdir} (or run "
                f"python -m regime_jax.report --workdir {workdir})"
            )
    finally:
        members.close()
    return out


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
    "axes": "lag map: each axis's values in plot order (settings carry axis and value)",
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
        if name.startswith("axes."):
            out[name] = f"lag map: the values of axis {name.split('.', 1)[1]!r} in plot order"
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
        f"         [--[no]compilation_cache] [--workers N [--devices 0,1,...]]\n"
        f"         [--task_index I --num_tasks N] [--config.<field>=<value> ...]\n\n"
        f"Overrides and errors work as in regime_jax.main: a field typo, a value of the\n"
        f"wrong type, an unknown config or an unknown :arg is one line and exit code 2.\n"
        f"Exit codes: 0 every run finished, 1 some run failed (the others still ran), 2 a\n"
        f"user error, 130 SIGINT, 143 SIGTERM (the current run stops after its step with a\n"
        f"checkpoint; finished runs are skipped when the same command is run again).\n\n"
        f"flags:\n  --config: {flags.FLAGS['config'].help}\n"
        f"  --workdir: {flags.FLAGS['workdir'].help}\n"
        f"  --[no]compilation_cache: {flags.FLAGS['compilation_cache'].help} (default: true)\n"
        f"  --workers: {flags.FLAGS['workers'].help} (default: 1)\n"
        f"  --devices: {flags.FLAGS['devices'].help}\n"
        f"  --task_index, --num_tasks (or --task-index, --num-tasks): "
        f"{flags.FLAGS['num_tasks'].help}\n"
        f"  --verbosity: absl logging verbosity (default: warnings only)\n\n"
        f"sweep config fields (--config.<field>=<default>  meaning) of {source}:\n{described}\n"
    )


SLURM_ENV = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
CPUS_ENV = "REGIME_JAX_SWEEP_CPUS"  # a worker's cores, set by the --workers parent


def task_from(index: int | None, count: int | None, env: Mapping[str, str]) -> Task:
    """This process's :class:`Task`: ``--task_index`` / ``--num_tasks``, else a SLURM job
    array's ``SLURM_ARRAY_TASK_ID`` (less ``SLURM_ARRAY_TASK_MIN``, over
    ``SLURM_ARRAY_TASK_STEP``) of ``SLURM_ARRAY_TASK_COUNT``, else the whole grid."""
    if (index is None) != (count is None):
        raise ConfigError("--task_index and --num_tasks go together: give both or neither")
    if index is not None:
        return Task(index, count)
    if not all(name in env for name in SLURM_ENV):
        return Task()
    try:
        first, step = (
            int(env.get("SLURM_ARRAY_TASK_MIN", "0")),
            int(env.get("SLURM_ARRAY_TASK_STEP", "1")),
        )
        offset, count = int(env[SLURM_ENV[0]]) - first, int(env[SLURM_ENV[1]])
        index = offset // step if step > 0 and offset % step == 0 else -1
        return Task(index, count)
    except (ValueError, ConfigError):
        shown = {k: env.get(k) for k in (*SLURM_ENV, "SLURM_ARRAY_TASK_MIN")}
        raise ConfigError(
            f"the SLURM job array ({shown}) does not give a task index 0 to count-1: pass "
            f"--task_index and --num_tasks"
        ) from None


def parse_devices(text: str | None, workers: int) -> list[str] | None:
    """``--devices`` (``0,1,2,3``; ``0+1`` gives one worker two devices) as one
    ``CUDA_VISIBLE_DEVICES`` value per device entry; worker i gets entry i mod their number."""
    if text is None:
        return None
    entries = text.split(",")
    if workers < 2 or not all(re.fullmatch(r"[A-Za-z0-9-]+(\+[A-Za-z0-9-]+)*", e) for e in entries):
        raise ConfigError(
            f"--devices={text!r}: allowed: with --workers >= 2, device ids separated by commas "
            f"(worker i gets entry i mod their number; '0+1' gives a worker two devices)"
        )
    return [e.replace("+", ",") for e in entries]


def core_groups(cores: list[int], workers: int) -> list[list[int]] | None:
    """``workers`` disjoint, contiguous groups of ``cores`` (sizes differ by at most one);
    None if there are fewer cores than workers (then nobody is pinned)."""
    if workers > len(cores):
        return None
    return [
        cores[i * len(cores) // workers : (i + 1) * len(cores) // workers] for i in range(workers)
    ]


def _worker_env(i: int, workers: int, devices: list[str] | None, groups) -> dict[str, str]:
    env = dict(os.environ)
    for name in (*SLURM_ENV, CPUS_ENV):
        env.pop(name, None)  # the worker's task is given by flags
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]
        if len(devices) < workers:  # workers share a device: no one preallocates it
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    elif groups is not None:
        env[CPUS_ENV] = ",".join(map(str, groups[i]))
    return env


def _run_workers(overrides, base: Task, workers: int, devices, err_line) -> int:
    """Starts ``workers`` processes of this sweep, tasks ``base.index * workers + i`` of
    ``base.count * workers``, and waits for them; passes SIGINT / SIGTERM on to them (they run
    in their own session, so a terminal's Ctrl-C reaches each once, through this process)."""
    import signal
    import subprocess
    import sys

    f = flags.FLAGS
    common = [f"--config={f.config}", f"--workdir={f.workdir}"]
    common.append("--compilation_cache" if f.compilation_cache else "--nocompilation_cache")
    if f["verbosity"].present:
        common.append(f"--verbosity={f.verbosity}")
    common += [f"--config.{k}" + ("" if v is None else f"={v}") for k, v in overrides]
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = []
    groups = core_groups(cores, workers) if devices is None and cores else None
    count = base.count * workers
    procs = []
    for i in range(workers):
        index = base.index * workers + i
        command = [
            sys.executable,
            "-m",
            PROG,
            *common,
            f"--task_index={index}",
            f"--num_tasks={count}",
        ]
        env = _worker_env(i, workers, devices, groups)
        where = env.get("CUDA_VISIBLE_DEVICES") if devices else env.get(CPUS_ENV, "all cores")
        procs.append(subprocess.Popen(command, env=env, start_new_session=True))
        print(f"worker {i}: task {index} of {count} on {where}, pid {procs[-1].pid}", flush=True)

    def forward(signum, frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    for sig in signals.SIGNALS:
        signal.signal(sig, forward)
    codes = [proc.wait() for proc in procs]
    bad = {i: c for i, c in enumerate(codes) if c}
    if not bad:
        return 0
    err_line(f"worker(s) exited with a non-zero code: {bad} (worker: code)")
    for code in (130, 143, 2, 1):  # a stop, then a user error, then failed runs
        if code in codes:
            return code
    return max(codes)


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
        f = flags.FLAGS
        if f.workers < 1:
            raise ConfigError(f"--workers={f.workers}: allowed: an integer >= 1")
        task = task_from(f.task_index, f.num_tasks, os.environ)
        devices = parse_devices(f.devices, f.workers)
        sweep = cli.load_with_overrides(f.config, overrides, sweep=True)
        cli.quiet_logging()  # keep one line per run readable
        cli.quiet_library_noise()
        workdir = Path(f.workdir)
        if f.workers > 1:
            check_paths(workdir, expand_grid(sweep))  # every user error before a worker starts
            return _run_workers(overrides, task, f.workers, devices, err_line)
        if os.environ.get(CPUS_ENV):  # before JAX sizes its thread pools
            os.sched_setaffinity(0, [int(c) for c in os.environ[CPUS_ENV].split(",")])
        if f.compilation_cache:
            enable_compilation_cache(workdir / ".jax_cache")
        log = (
            print if task.count == 1 else (lambda line: print(f"t{task.index} {line}", flush=True))
        )
        result = run_sweep(sweep, workdir, log=log, task=task)
        signals.completed("the sweep completed" + (" (report written)" if result["report"] else ""))
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
    flags.DEFINE_integer(
        "workers", 1, "Worker processes on this machine, each running one run at a time."
    )
    flags.DEFINE_string(
        "devices", None, "With --workers: CUDA_VISIBLE_DEVICES of each worker, e.g. 0,1,2,3."
    )
    flags.DEFINE_integer(
        "task_index", None, "This process's task, 0 to --num_tasks - 1 (default: SLURM array)."
    )
    flags.DEFINE_integer(
        "num_tasks",
        None,
        "This process is task --task_index of --num_tasks started separately on one workdir "
        "(default: SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT, else 0 of 1).",
    )
    flags.DEFINE_alias("task-index", "task_index")
    flags.DEFINE_alias("num-tasks", "num_tasks")


def main() -> None:
    _define_flags()
    cli.run_and_exit(run)


if __name__ == "__main__":
    main()
