"""The application: a run in a workdir, resumable, under lock, stoppable by signal.

:func:`train_and_evaluate` builds a run from a config (and optionally a user's model, dataset
and loss), takes the workdir's lock, resumes from the newest checkpoint if the stored config
matches, and drives an :class:`~regime_jax.run.engine.Engine` chunk by chunk through the run's
:class:`~regime_jax.schedule.Schedule` (which steps record, evaluate, test stability,
checkpoint, log or may freeze). Every metric stays on device
and is fetched on the log cadence, one step late (after dispatching step t it fetches up to
t - 1), under a device-to-host transfer guard so an accidental per-step sync fails loudly.
Rows go to ``metrics.jsonl`` and TensorBoard, masks to snapshot files, and a finished run gets
its ``summary.json`` from :mod:`regime_jax.analysis.summary`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import re
import signal
import types
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from regime_jax import data, gating, models, records
from regime_jax.analysis import online, summary, timescales
from regime_jax.configs.base import ADDED_FIELDS, ConfigError, validate_config
from regime_jax.models.adapt import Net, as_net, with_activations
from regime_jax.registry import CUSTOM
from regime_jax.run import (
    checkpoint,
    engine,
    fingerprint,
    freeze,
    hosts,
    rundir,
    signals,
    step,
)
from regime_jax.run.engine import stability_config
from regime_jax.run.step import LossFn, Placement, TrainState
from regime_jax.schedule import Schedule

# Fields that do not change a run's results: a resumed run may differ in these.
# Fields that do not change a run's records: record.probe_chunk changes memory, not a bit.
# fields that say how, not what: a run resumed with another value computes the same records
RESUME_IGNORES = (
    "overwrite",
    "log_every_steps",
    "checkpoint",
    "record.probe_chunk",
    "decouple.cache",
)
SITES_TXT, SITES_JSON = "sites.txt", "sites.json"  # the site table of the run's model
SAMPLE_JSON = "sample.json"  # the units and positions a sampled run records


class Interrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM in the loop: metrics were flushed and a checkpoint saved at ``step``."""

    def __init__(self, step: int, signum: int = signal.SIGINT):
        super().__init__(
            f"{signals.name(signum)}: interrupted at step {step}; metrics flushed and a "
            f"checkpoint saved; run the same command again to resume"
        )
        self.step, self.signum = step, signum
        self.exit_code = signals.exit_code(signum)


class NonFinite(FloatingPointError):
    """A non-finite loss or step size; says which checkpoint is kept, if any."""

    def __init__(self, err: FloatingPointError, workdir: Path, kept: list[int]):
        where = f"metrics up to there are in {workdir / records.METRICS}"
        advice = (
            "change the config (e.g. a lower optimizer.learning_rate) and rerun with "
            "--config.overwrite=True"
        )
        if kept:
            tail = (
                f"the newest good checkpoint is step {kept[-1]} "
                f"({workdir / checkpoint.CHECKPOINTS / str(kept[-1])}); rerunning the same "
                f"command resumes there and meets the same values, so {advice}"
            )
        else:
            tail = f"no checkpoint was saved before it; {advice}"
        super().__init__(f"{str(err).removesuffix('; stopping')}; {where}; {tail}")
        self.checkpoint_step = kept[-1] if kept else None


# ------------------------------------------------------------------------------ building a run


def check_config(config: ml_collections.ConfigDict) -> None:
    """The schema, then what only the implementations know; ConfigError naming the field."""
    validate_config(config)
    if config.model.name != CUSTOM:
        try:
            models.create_model(config.model, num_classes=10)  # the module only; no arrays
        except ValueError as err:
            raise ConfigError(str(err)) from err
    for field, check in (
        ("stability", lambda: stability_config(config)),
        ("timescales", lambda: timescales.DecayConfig(**config.timescales)),
        ("decouple.online", lambda: online.OnlineConfig(**config.decouple.online)),
    ):
        try:
            check()
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{field}: {err}") from err


def _fingerprint(ds: data.Dataset) -> str:
    digest = hashlib.sha256()
    for a in (ds.x_train, ds.y_train, ds.x_val, ds.y_val):
        digest.update(str((a.shape, a.dtype)).encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()[:16]


def _qualname(obj: Any) -> str:
    """``module.qualname`` of a function or class, else of the object's class."""
    named = obj if isinstance(obj, type | types.FunctionType) else type(obj)
    return f"{named.__module__}.{named.__qualname__}"


def with_user_pieces(
    config: ml_collections.ConfigDict, model: Any = None, dataset: Any = None, loss_fn: Any = None
) -> ml_collections.ConfigDict:
    """A copy of ``config`` naming the user's objects (``name="custom"``) so resume can check."""
    out = ml_collections.ConfigDict(config.to_dict())
    if model is not None:
        out.model = {
            "name": CUSTOM,
            "class": _qualname(type(getattr(model, "module", None) or model)),
        }
    if dataset is not None:
        if not isinstance(dataset, data.Dataset):
            raise ConfigError(f"dataset: expected a regime_jax.data.Dataset, not {type(dataset)}")
        out.dataset = {"name": CUSTOM, "label": dataset.name, "fingerprint": _fingerprint(dataset)}
    if loss_fn is not None:
        if not callable(loss_fn):
            raise ConfigError(f"loss_fn: expected a callable, not {type(loss_fn).__name__}")
        out.loss = {"name": CUSTOM, "function": _qualname(loss_fn)}
    return out


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run is built from, all checked before any file is written."""

    config: ml_collections.ConfigDict
    schedule: Schedule  # every cadence of the run
    ds: data.Dataset
    probe_idx: np.ndarray
    net: Net
    tx: optax.GradientTransformation
    place: Placement
    loss_fn: LossFn
    gated_net: gating.GatedNet | None  # the model's gated transform, if the run may freeze
    # the frozen phase's cached path (gate bits of every training example), if it applies
    masked_net: gating.MaskedNet | None = None
    frozen_path: str = ""  # why the frozen phase takes its path, one line ('' if no freeze)


def _need(config: ml_collections.ConfigDict, field: str, given: Any, argument: str) -> None:
    if given is None and config[field].name == CUSTOM:
        raise ConfigError(
            f"{field}.name={CUSTOM!r} needs the object: "
            f"train_and_evaluate(config, workdir, {argument}=...)"
        )


def build(config, *, model=None, dataset=None, loss_fn=None) -> Setup:
    """Checked config -> :class:`Setup`; ConfigError before any compute or write."""
    check_config(config)
    _need(config, "model", model, "model")
    _need(config, "dataset", dataset, "dataset")
    try:
        ds = dataset if dataset is not None else data.load_dataset(config.dataset)
        probe_idx = data.probe_indices(len(ds.y_val), config.probe.size, config.probe.seed)
        data.check_batch_size(ds, config.batch_size)
        sizes = {"batch_size": config.batch_size, "probe.size": config.probe.size}
        place = Placement.for_devices(config.parallel.devices, sizes)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if model is None:
        model = models.create_model(config.model, ds.num_classes)
    activations = tuple(config.record.get("activations", ADDED_FIELDS["record.activations"]))
    net = with_activations(as_net(model), activations)
    tx = step.make_optimizer(config.optimizer, config.num_steps)
    schedule = Schedule.from_config(config)
    if schedule.freezes and net.modes is not None:
        raise ConfigError(
            f"decouple.freeze_step / decouple.auto: gate freezing needs a model without a train "
            f"mode, and {_qualname(model)} sets one with {net.modes.flag!r}; leave "
            f"decouple.freeze_step=-1 and decouple.auto=False"
        )
    gated_net = gating.gated_net(net, activations) if schedule.freezes else None
    loss_fn = loss_fn or step.cross_entropy
    setup = Setup(config, schedule, ds, probe_idx, net, tx, place, loss_fn, gated_net)
    _check_model(setup)
    if gated_net is not None:
        masked_net, why = _frozen_path(setup)
        setup = dataclasses.replace(setup, masked_net=masked_net, frozen_path=why)
    return setup


# The most device memory the frozen phase's gate cache may take (decouple.cache="auto").
CACHE_MAX_BYTES = 512 * 2**20


def _frozen_path(setup: Setup) -> tuple[gating.MaskedNet | None, str]:
    """The cached frozen phase (gate bits of every training example, no gate forward) where it
    applies, else None (the gate network runs at every step); with the reason, one line."""
    if setup.config.decouple.get("cache", "auto") == "off":
        return None, "gated: the gate network runs at every step (decouple.cache='off')"
    activations = tuple(setup.config.record.get("activations", ("relu",)))
    if activations != ("relu",):  # a GELU's frozen form needs g(z_gates), not a bit
        return None, (
            f"gated: the gate network runs at every step (the cache holds ReLU bits only; "
            f"record.activations={activations})"
        )
    ds, net = setup.ds, setup.net
    x1 = jax.ShapeDtypeStruct((1, *ds.x_train.shape[1:]), ds.x_train.dtype)
    params = jax.eval_shape(net.init, jax.random.key(0), x1)
    masked = gating.masked_net(net)
    try:
        per_example = gating.gate_bits_per_example(net, params, x1)
        bits = jax.eval_shape(masked.gate_bits, params, x1)
        jax.eval_shape(masked.preacts_fn, params, bits, x1)  # refuses a ReLU in a scan
    except ValueError as err:
        return None, f"gated: the gate network runs at every step ({str(err).splitlines()[0]})"
    size = per_example * (len(ds.y_train) + len(setup.probe_idx))
    size += ds.x_train.nbytes + ds.y_train.nbytes  # the training split, on device with it
    if size > CACHE_MAX_BYTES:
        return None, (
            f"gated: the gate network runs at every step (a gate cache of {size} bytes would "
            f"exceed {CACHE_MAX_BYTES})"
        )
    return masked, (
        f"cached: gate bits and data of {len(ds.y_train)} training examples on device, {size} "
        f"bytes; no gate forward"
    )


def _check_model(setup: Setup) -> None:
    """Traces (no compute) the initial state: a model with no ReLU fails before any write.

    A model with a train mode also traces one training step: a model that fails in train
    mode (an RNG stream other than ``dropout``, a Dropout without its RNG) fails here.
    """
    x = setup.ds.x_val
    probe_x = jax.ShapeDtypeStruct((len(setup.probe_idx), *x.shape[1:]), x.dtype)
    init = functools.partial(
        step.create_train_state,
        setup.net,
        setup.tx,
        monitor_options=step.monitor_options_of(setup.config),
    )
    try:
        state = jax.eval_shape(init, jax.random.key(0), probe_x)
        if setup.gated_net is not None:  # the gated transform refuses what capture refuses
            jax.eval_shape(setup.gated_net.preacts_fn, state.params, state.params, probe_x)
    except ValueError as err:  # CaptureError (no ReLU, refused construct) or a bad probe shape
        raise ConfigError(f"model: {err}") from err
    if setup.net.modes is None:
        return
    size, ds = setup.config.batch_size, setup.ds
    batch = {
        "x": jax.ShapeDtypeStruct((size, *ds.x_train.shape[1:]), ds.x_train.dtype),
        "y": jax.ShapeDtypeStruct((size, *ds.y_train.shape[1:]), ds.y_train.dtype),
    }
    train = functools.partial(
        step.train_step, model=setup.net, tx=setup.tx, record=True, loss_fn=setup.loss_fn
    )
    try:
        jax.eval_shape(train, state, batch, {"x": probe_x})
    except Exception as err:  # whatever the model raises in train mode
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        line = re.sub(r"\s*\(https?://\S+\)$", "", line)  # flax's docs link
        how = (
            "every RNG stream the module holds (nnx.Dropout(rate, rngs=rngs)) reseeded per step"
            if setup.net.modes.flag == "nnx"
            else f"{setup.net.modes.flag!r} set, rngs={{'dropout': key}} per step"
        )
        raise ConfigError(
            f"model: its training step in train mode ({how}) fails: {type(err).__name__}: {line}"
        ) from err


@dataclasses.dataclass(frozen=True)
class Restored:
    """A run read back for analysis: its model, probe inputs and two train states."""

    model: Net
    probe_x: np.ndarray
    initial: TrainState
    latest: TrainState
    step: int


def restore(config, workdir: str | Path, *, model=None, dataset=None) -> Restored:
    """The initial state (rebuilt from ``config.seed``) and newest checkpoint of a run.

    Example (needs a run directory, so not a doctest)::

        r = restore(config, "runs/mlp_mnist1d")
        analyzer.flip_rates(r.initial.masks, r.latest.masks)["all"]
    """
    setup = build(config, model=model, dataset=dataset)
    probe_x = setup.ds.x_val[setup.probe_idx]
    initial = step.create_train_state(
        setup.net,
        setup.tx,
        jax.random.key(config.seed),
        probe_x,
        decoupled=setup.gated_net is not None,
        monitor_options=step.monitor_options_of(config),
    )
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.keep)
    try:
        restored = ckpt.restore_latest(initial)
    finally:
        ckpt.close()
    if restored is None:
        raise checkpoint.CheckpointError(f"workdir={str(workdir)!r} holds no checkpoint")
    return Restored(setup.net, probe_x, initial, restored[1], restored[0])


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    model: Any = None,
    dataset: data.Dataset | None = None,
    loss_fn: LossFn | None = None,
) -> dict:
    """Trains per ``config`` into ``workdir`` (resuming a run found there); returns the last row.

    Args:
      model: a user's model instead of ``config.model``: a linen module, an initialized NNX
        module, or a ``models.Net``; its ReLUs are found by ``capture_relus``. A model with a
        train mode (a linen ``__call__`` taking ``train`` / ``training`` / ``deterministic``;
        an NNX module with Dropout / BatchNorm) trains in train mode with a dropout key per
        step (``fold_in`` of the run's key and the step) and its batch statistics updated
        and checkpointed, and is evaluated, probed and stability-tested in eval mode; a linen
        model that holds ``batch_stats`` or draws an RNG without such an argument is refused
        (ConfigError naming the flag), as is gate freezing (``decouple.*``) of such a model.
      dataset: a user's :class:`regime_jax.data.Dataset` instead of ``config.dataset``.
      loss_fn: ``loss_fn(logits, y) -> per-example losses [B]`` instead of cross-entropy;
        accuracy is reported only for integer labels with one logit per class.
      ``config.json`` records each user piece as ``name="custom"`` with what identifies it.

    Raises:
      ConfigError: a bad field, or a workdir holding a run with a different config.
      rundir.WorkdirBusy: another live process holds the workdir (nothing touched).
      records.RecordError: the workdir's records end before its newest readable checkpoint.
      NonFinite (a FloatingPointError): a non-finite loss or step; metrics so far are kept.
      Interrupted: SIGINT or SIGTERM; metrics were flushed and a checkpoint saved.
    """
    if model is not None or dataset is not None or loss_fn is not None:
        config = with_user_pieces(config, model, dataset, loss_fn)
    setup = build(config, model=model, dataset=dataset, loss_fn=loss_fn)
    workdir = Path(workdir)
    primary = hosts.is_primary()  # with several processes, process 0 writes the files
    with rundir.lock(workdir) if primary else contextlib.nullcontext():  # before any write
        last = _Run(setup, workdir).train()
        if primary:
            summary.write_run_summary(workdir)
    return last


# ------------------------------------------------------------------------------ running it


class _Run:
    """One training run in a locked workdir: resume, the freeze policy, checkpoints, signals.

    The state and what computes on it are the :class:`~regime_jax.run.engine.Engine`'s; what
    happens at each step is the setup's :class:`~regime_jax.schedule.Schedule`'s.
    """

    def __init__(self, setup: Setup, workdir: Path):
        self.setup, self.config, self.workdir = setup, setup.config, workdir
        self.schedule, self.primary = setup.schedule, hosts.is_primary()
        data_id = self.config.dataset.get("fingerprint") or _fingerprint(setup.ds)
        self.fp = fingerprint.make(self.config.to_dict(), data_id, RESUME_IGNORES)
        self.strict = fingerprint.path(workdir).exists()  # a run from before fingerprints: no
        resume = (
            rundir.open_run(self.config.to_dict(), workdir, RESUME_IGNORES, self.fp)
            if self.primary
            else 0
        )
        resume = hosts.agree(resume)  # the others wait here for process 0's decision
        self.engine = engine.Engine(setup)  # the probe set on device, step 0's state
        self.ckpt = checkpoint.Checkpointer(workdir, self.config.checkpoint.keep)
        self.ckpt.fingerprint = self.fp  # each checkpoint carries it
        self.policy = freeze.FreezePolicy.from_config(self.config, self.schedule)  # once a run
        try:
            self.start = self._resume() if resume else 0
            if self.primary:
                if not resume or self.strict:  # created, or extended: what the run now is
                    fingerprint.write(workdir, self.fp)
                records.write_config(workdir, self.config.to_dict())
                self._write_sites(announce=not resume)
                self._write_sample()
        except BaseException:
            self.ckpt.close()
            raise

    def _write_sample(self) -> None:
        """``sample.json``: the units and positions a sampled run records (record.sample_*)."""
        options = step.monitor_options_of(self.config)
        if options.sample_units is None and options.sample_positions is None:
            return
        e = self.engine
        variables = step.model_variables(self.setup.net, e.state)
        index = step.monitor_sample(self.setup.net, variables, e.probe["x"], options)
        rows = {
            k: {f: None if v is None else v.tolist() for f, v in idx.items()}
            for k, idx in index.items()
        }
        records.write_atomic(self.workdir / SAMPLE_JSON, records.to_json(rows, indent=1) + "\n")

    def _write_sites(self, announce: bool) -> None:
        """``sites.txt`` / ``sites.json``: every ReLU site found, measured or not and why."""
        table = self.engine.site_table()
        if table is None:  # a Net built by hand with its own preacts_fn
            return
        text, rows = table
        records.write_atomic(self.workdir / SITES_TXT, text + "\n")
        records.write_atomic(self.workdir / SITES_JSON, records.to_json(rows, indent=1) + "\n")
        if announce:
            print(f"layers found ({self.workdir / SITES_TXT}):\n{text}", flush=True)

    def _resume(self) -> int:
        """The newest checkpoint's step (0: none) and its state in the engine; the records
        are cut to match (and checked: never a partial one); the detector reads them again."""
        check = functools.partial(
            rundir.checkpoint_mismatch,
            current=self.fp,
            config=self.config.to_dict(),
            strict=self.strict,
        )
        like = self.engine.state
        restored = self._verified(self.ckpt.restore_latest(like, check), like, check)
        start = restored[0] if restored else 0
        if self.primary:
            if restored:
                records.check_record(self.workdir, self.config, start)
            records.truncate_after(self.workdir, start if restored else -1)
            print(f"resuming {self.workdir} from step {start}", flush=True)
        if restored:
            self.engine.resume(restored[1])
            if self.policy.auto and not self.engine.frozen:
                rows = records.read_rows(self.workdir)  # atomic truncation: any process
                self.policy.feed(r for r in rows if r["step"] <= start)
        return start

    def _verified(self, restored, like, check):
        """``restored`` if every mask snapshot up to its step reads and matches the hashes
        its checkpoint recorded; else each broken one is moved to ``broken_masks/``, the
        checkpoints at or after the first of them to ``broken_checkpoints/``, and the run
        resumes from the newest checkpoint before it (None: from step 0), which writes them
        again."""
        while restored is not None:
            below = -1
            if self.primary:
                start = restored[0]
                try:
                    hashes = (self.ckpt.metadata(start) or {}).get("masks")
                except ValueError:
                    hashes = None
                folder = self.workdir / records.MASKS_DIR
                names = (
                    p.name.removeprefix("step_").removesuffix(".npz")
                    for p in folder.glob("step_*.npz")
                )
                steps = sorted(int(n) for n in names if n.isdigit() and int(n) <= start)
                bad = fingerprint.bad_snapshots(self.workdir, steps, hashes)
                for s, why in bad:
                    moved = fingerprint.set_aside_snapshot(self.workdir, s)
                    print(
                        f"mask snapshot of step {s} is broken ({why}); moved to {moved}", flush=True
                    )
                if bad:
                    below = min(s for s, _ in bad)
                    for ck in self.ckpt._step_dirs():
                        if ck >= below:
                            self.ckpt.set_aside(ck)
            below = hosts.agree(below)
            if below < 0:
                return restored
            hosts.barrier(f"regime_jax_snapshots_{below}")
            restored = self.ckpt.restore_latest(like, check, below=below)
            if self.primary:
                at = restored[0] if restored else 0
                print(f"resuming from step {at} to write the snapshot of step {below} again")
        return None

    def train(self) -> dict:
        """Runs the remaining steps; NonFinite / Interrupted as documented on the caller."""
        try:
            self.engine.prepare(self.workdir, self.start, write=self.primary)
            if self.start == 0:
                self.engine.record_initial()
                self._maybe_freeze(0)
            stop = hosts.SyncedStop() if hosts.several() else signals.StopFlag()
            with stop, jax.transfer_guard_device_to_host("disallow"):
                self._steps(stop)
        except FloatingPointError as err:
            raise NonFinite(err, self.workdir, self.ckpt.steps()) from None
        finally:
            self.engine.close()
            self.ckpt.close()
        return self.engine.last_row

    def _maybe_freeze(self, step_: int) -> None:
        """Freezes the gates after ``step_`` if the policy says so (before its checkpoint)."""
        if not self.engine.frozen and self.policy.due(step_):
            self.engine.freeze(step_)
            if self.primary:
                print(f"decouple: gates frozen at step {step_}", flush=True)
                print(f"decouple: frozen phase {self.setup.frozen_path}", flush=True)

    def _steps(self, stop: signals.StopFlag | hosts.SyncedStop) -> None:
        """Chunk by chunk (:meth:`~regime_jax.schedule.Schedule.chunks`); fetches one chunk
        late, and every row before a checkpoint or a freeze decision."""
        eng, schedule, policy = self.engine, self.schedule, self.policy
        for chunk in schedule.chunks(self.start):
            eng.advance(chunk)
            stopping = stop.set  # read once: a signal may land during the flush
            save = schedule.checkpoints(chunk.last) or stopping
            check = not eng.frozen and policy.is_check(chunk.last)  # rows up to here
            policy.feed(eng.fetch(chunk, now=save or check))
            self._maybe_freeze(chunk.last)
            if save:
                self.ckpt.save(chunk.last, eng.state)
            if stopping:
                eng.stop_clock(chunk.last)
                raise Interrupted(chunk.last, stop.signum)
        eng.stop_clock(schedule.num_steps)
