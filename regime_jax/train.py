"""Instrumented training: a pure step that also measures patterns, and the host loop.

``train_step(state, batch, probe)`` is a pure function: one optimizer update, then (record
variant) the probe set's packed patterns under the *post-update* parameters, flip rates
against the previous patterns carried in the state, dead / always-on fractions, and step
sizes from the optimizer's updates. Two variants (record or not) are each jitted once with
the state donated. The loop keeps every metric on device and fetches on the log cadence, one
step late (after dispatching step t it fetches up to t - 1), under a device-to-host transfer
guard so an accidental per-step sync fails loudly.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from regime_jax import (
    analyzer,
    checkpoint,
    data,
    live,
    models,
    records,
    report,
    rundir,
    signals,
    stability,
)
from regime_jax.bitmask import Packed
from regime_jax.config import CUSTOM_MODEL, ConfigError, probe_config, validate_config
from regime_jax.models.adapt import Net, as_net
from regime_jax.records import itstime, log_spaced_steps

Patterns = dict[str, Packed]


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; ``monitor`` holds the patterns of the last record."""

    step: jax.Array
    params: Any
    opt_state: Any
    monitor: analyzer.MonitorState

    @property
    def masks(self) -> Patterns:
        """Packed probe patterns at the last record step."""
        return self.monitor.masks


def make_optimizer(cfg: Mapping[str, Any], num_steps: int) -> optax.GradientTransformation:
    """SGD (momentum) or Adam with a constant or cosine learning rate (optional warmup)."""
    lr, warmup = float(cfg["learning_rate"]), int(cfg.get("warmup_steps", 0))
    if cfg["schedule"] == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, num_steps)
    elif warmup:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    else:
        schedule = optax.constant_schedule(lr)
    if cfg["name"] == "sgd":
        return optax.sgd(schedule, momentum=float(cfg.get("momentum", 0.0)) or None)
    return optax.adam(schedule)


def _monitor(net: Net, probe_x: jax.Array) -> analyzer.PatternMonitor:
    return analyzer.pattern_monitor(net.preacts_fn, probe_x)


def probe_patterns(model: Any, params: Any, probe_x: jax.Array) -> Patterns:
    """Packed ``z > 0`` of every ReLU layer on the probe inputs."""
    return analyzer.patterns_from_preacts(as_net(model).preacts_fn(params, probe_x)[1])


def create_train_state(
    model: Any, tx: optax.GradientTransformation, key: jax.Array, probe_x: jax.Array
) -> TrainState:
    """Initial state; its masks are the probe patterns of the initial parameters (step 0)."""
    net = as_net(model)
    params = net.init(key, probe_x[:1])
    monitor = _monitor(net, probe_x).init(params)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), monitor)


def _loss_fn(params: Any, batch: Mapping[str, jax.Array], net: Net):
    logits_BxK = net.apply(params, batch["x"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxK, batch["y"]).mean()
    return loss, logits_BxK


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    probe: Mapping[str, jax.Array],
    *,
    model: Any,
    tx: optax.GradientTransformation,
    record: bool,
) -> tuple[TrainState, dict[str, jax.Array], Patterns | None]:
    """One update, then the monitor: step sizes, and with ``record`` the post-update patterns."""
    net = as_net(model)
    (loss, logits_BxK), grads = jax.value_and_grad(_loss_fn, has_aux=True)(state.params, batch, net)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    monitored, monitor = _monitor(net, probe["x"]).update(
        state.monitor, params, updates, patterns=record
    )
    metrics = {
        "train/loss": loss,
        "train/acc": jnp.mean(jnp.argmax(logits_BxK, -1) == batch["y"]),
        **monitored,
    }
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, monitor=monitor)
    return state, metrics, (monitor.masks if record else None)


def eval_step(params: Any, batch: Mapping[str, jax.Array], *, model: Any):
    """Summed loss and correct count over a padded batch (``w`` masks the padding)."""
    logits_BxK = as_net(model).apply(params, batch["x"])
    losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxK, batch["y"])
    correct_B = jnp.argmax(logits_BxK, -1) == batch["y"]
    return {"loss": jnp.sum(losses_B * batch["w"]), "correct": jnp.sum(correct_B * batch["w"])}


def make_step_fns(model: Any, tx: optax.GradientTransformation) -> dict[bool, Any]:
    """The two jitted step variants, keyed by ``record``; each traces once."""
    net = as_net(model)
    return {
        record: jax.jit(
            functools.partial(train_step, model=net, tx=tx, record=record),
            donate_argnames="state",
        )
        for record in (False, True)
    }


def _eval_batches(
    ds: data.Dataset, batch_size: int, sharding: Any = None
) -> list[dict[str, jax.Array]]:
    """The validation split as equal, zero-padded device batches (one compile).

    With a data-parallel ``sharding`` the batch size is rounded up to a multiple of the
    device count; the padding has weight 0.
    """
    n = len(ds.y_val)
    size = min(batch_size, n)
    if sharding is not None:
        size = -(-size // sharding.num_devices) * sharding.num_devices
    out = []
    for start in range(0, n, size):
        idx = np.arange(start, start + size)
        w = (idx < n).astype(np.float32)
        idx = np.minimum(idx, n - 1)
        out.append(jax.device_put({"x": ds.x_val[idx], "y": ds.y_val[idx], "w": w}, sharding))
    return out


@dataclasses.dataclass(frozen=True)
class Placement:
    """Data-parallel placement: batches and the probe set sharded on "data", state replicated.

    With one device both are None (the default device, no sharding annotations), so a 1-device
    run compiles exactly the program it did before meshes existed: same bytes.
    """

    data: NamedSharding | None
    replicated: NamedSharding | None

    @classmethod
    def for_config(cls, config: ml_collections.ConfigDict) -> Placement:
        """The mesh of ``parallel.devices`` local devices; ConfigError if it cannot be made."""
        available = jax.local_device_count()
        n = config.parallel.devices or available
        if n > available:
            raise ConfigError(
                f"parallel.devices={n} but this process has {available} local device(s); "
                f"allowed values: 0 (all) .. {available}"
            )
        field = "parallel.devices" + ("" if config.parallel.devices else f" (0: all {n})")
        for name, size in (("batch_size", config.batch_size), ("probe.size", config.probe.size)):
            if size % n:
                raise ConfigError(
                    f"{name}={size} is not divisible by {field}={n}: each device takes an equal "
                    f"share; use a multiple of {n} or set parallel.devices"
                )
        if n == 1:
            return cls(None, None)
        mesh = jax.make_mesh(
            (n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.local_devices()[:n]
        )
        return cls(NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec()))


def evaluate(eval_fn, params: Any, batches: list[dict[str, jax.Array]], n: int):
    """Device-side ``eval/loss`` and ``eval/acc`` over the whole validation split."""
    sums = [eval_fn(params, b) for b in batches]
    loss = sum(s["loss"] for s in sums) / n
    return {"eval/loss": loss, "eval/acc": sum(s["correct"] for s in sums) / n}


class _Fetcher:
    """Holds device metrics until the log cadence, then writes rows and mask snapshots."""

    def __init__(self, workdir: Path, writer: records.MetricsWriter, scalars: live.Scalars):
        self.workdir, self.writer, self.scalars, self.pending = workdir, writer, scalars, []
        self.last_row: dict[str, Any] = {}

    def add(self, step: int, metrics: dict, masks: Patterns | None) -> None:
        self.pending.append((step, metrics, masks))

    def flush(self, keep_last: bool) -> list[dict[str, Any]]:
        ready = self.pending[:-1] if keep_last else self.pending
        self.pending = self.pending[len(ready) :]
        rows = []
        for step, metrics, masks in jax.device_get(ready):
            rows.append({"step": step, **metrics})
            if masks is not None:
                records.write_masks(self.workdir, step, masks)
        self.writer.write(rows)
        self.scalars.write(rows)
        self.last_row = rows[-1] if rows else self.last_row
        for row in rows:
            bad = [
                k for k in ("train/loss", "step/abs/all") if k in row and not np.isfinite(row[k])
            ]
            if bad:
                raise FloatingPointError(f"non-finite {bad} at step {row['step']}; stopping")
        return rows


# Fields that do not change a run's results: a resumed run may differ in these.
RESUME_IGNORES = ("overwrite", "log_every_steps", "checkpoint")


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
        if kept:
            tail = (
                f"the newest good checkpoint is step {kept[-1]} "
                f"({workdir / checkpoint.CHECKPOINTS / str(kept[-1])}); rerunning the same "
                f"command resumes there and meets the same values, so change the config (e.g. "
                f"a lower optimizer.learning_rate) and rerun with --config.overwrite=True"
            )
        else:
            tail = (
                "no checkpoint was saved before it; change the config (e.g. a lower "
                "optimizer.learning_rate) and rerun with --config.overwrite=True"
            )
        super().__init__(f"{str(err).removesuffix('; stopping')}; {where}; {tail}")
        self.checkpoint_step = kept[-1] if kept else None


def _open_workdir(config: ml_collections.ConfigDict, workdir: Path) -> bool:
    """Prepares the locked ``workdir``; True if an earlier run there should be resumed."""
    return rundir.open_run(config.to_dict(), workdir, RESUME_IGNORES)


def with_model(config: ml_collections.ConfigDict, model: Any) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose ``model`` names a user's model object (``name="custom"``)."""
    out = ml_collections.ConfigDict(config.to_dict())
    cls = type(getattr(model, "module", None) or model)
    out.model = {"name": CUSTOM_MODEL, "class": f"{cls.__module__}.{cls.__qualname__}"}
    return out


def _build(config: ml_collections.ConfigDict, model: Any = None):
    """Validated config -> (dataset, probe indices, net, optimizer, placement); no compute."""
    validate_config(config)
    if model is None and config.model.name == CUSTOM_MODEL:
        raise ConfigError(
            f"model.name={CUSTOM_MODEL!r} needs the model object: "
            f"train_and_evaluate(config, workdir, model=...)"
        )
    ds = data.load_dataset(config.dataset)
    probe_idx = data.probe_indices(len(ds.y_val), config.probe.size, config.probe.seed)
    if model is None:
        model = models.create_model(config.model, ds.num_classes)
    net, tx = as_net(model), make_optimizer(config.optimizer, config.num_steps)
    place = Placement.for_config(config)  # devices there, sizes divisible: before any write
    _check_model(net, tx, ds, len(probe_idx))
    return ds, probe_idx, net, tx, place


def _check_model(net: Net, tx: optax.GradientTransformation, ds: data.Dataset, size: int):
    """Traces (no compute) the initial state: a model with no ReLU fails before any write."""
    probe_x = jax.ShapeDtypeStruct((size, *ds.x_val.shape[1:]), ds.x_val.dtype)
    try:
        jax.eval_shape(functools.partial(create_train_state, net, tx), jax.random.key(0), probe_x)
    except ValueError as err:  # CaptureError (no ReLU, refused construct) or a bad probe shape
        raise ConfigError(f"model: {err}") from err


@dataclasses.dataclass(frozen=True)
class Restored:
    """A run read back for analysis: its model, probe inputs and two train states."""

    model: Net
    probe_x: np.ndarray
    initial: TrainState
    latest: TrainState
    step: int


def restore(config: ml_collections.ConfigDict, workdir: str | Path, model: Any = None) -> Restored:
    """The initial state (rebuilt from ``config.seed``) and newest checkpoint of a run.

    Example (needs a run directory, so not a doctest)::

        r = restore(config, "runs/mlp_mnist1d")
        analyzer.flip_rates(r.initial.masks, r.latest.masks)["all"]
    """
    ds, probe_idx, model, tx, _ = _build(config, model)
    probe_x = ds.x_val[probe_idx]
    initial = create_train_state(model, tx, jax.random.key(config.seed), probe_x)
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.keep)
    try:
        restored = ckpt.restore_latest(initial)
    finally:
        ckpt.close()
    if restored is None:
        raise checkpoint.CheckpointError(f"workdir={str(workdir)!r} holds no checkpoint")
    return Restored(model, probe_x, initial, restored[1], restored[0])


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, *, model: Any = None
) -> dict:
    """Trains per ``config`` into ``workdir`` (resuming a run found there); returns the last row.

    ``model``: a user's model object instead of ``config.model`` (a linen module, an
    initialized NNX module, or a ``models.Net``); its ReLUs are found by ``capture_relus``,
    and ``config.json`` records ``model.name="custom"`` with its class.

    Raises:
      ConfigError: a bad field, or a workdir holding a run with a different config.
      rundir.WorkdirBusy: another live process holds the workdir (nothing touched).
      records.RecordError: the workdir's records end before its newest readable checkpoint.
      NonFinite (a FloatingPointError): a non-finite loss or step; metrics so far are kept.
      Interrupted: SIGINT or SIGTERM; metrics were flushed and a checkpoint saved.
    """
    if model is not None:
        config = with_model(config, model)
    ds, probe_idx, model, tx, place = _build(config, model)
    workdir = Path(workdir)
    data.check_batch_size(ds, config.batch_size)
    with rundir.lock(workdir):  # before anything in workdir is written
        return _train(config, workdir, ds, probe_idx, model, tx, place)


def _train(config, workdir: Path, ds, probe_idx, model, tx, place: Placement) -> dict:
    """train_and_evaluate's body, run while holding the workdir's lock."""
    resume = _open_workdir(config, workdir)

    probe = jax.device_put({"x": ds.x_val[probe_idx], "y": ds.y_val[probe_idx]}, place.data)
    init_fn = jax.jit(
        functools.partial(create_train_state, model, tx), out_shardings=place.replicated
    )
    state = init_fn(jax.random.key(config.seed), probe["x"])
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.keep)
    start = 0
    try:
        if resume:
            restored = ckpt.restore_latest(state)
            start, state = restored if restored else (0, state)
            if restored:
                records.check_record(workdir, config, start)  # never resume a partial record
            records.truncate_after(workdir, start if restored else -1)
            print(f"resuming {workdir} from step {start}", flush=True)
        records.write_config(workdir, config.to_dict())
    except BaseException:
        ckpt.close()
        raise

    step_fns = make_step_fns(model, tx)
    eval_fn = jax.jit(functools.partial(eval_step, model=model))
    eval_batches = _eval_batches(ds, config.eval_batch_size, place.data)
    evaluate_now = lambda params: evaluate(eval_fn, params, eval_batches, len(ds.y_val))
    stab_steps = log_spaced_steps(n_steps := config.num_steps, config.stability.num_points)
    stab_fn = jax.jit(
        functools.partial(stability.probe_metrics, model.preacts_fn, config=probe_config(config))
    )
    stab_x = probe["x"][: config.stability.probe_size or None]
    stab_key = jax.random.key(config.stability.seed)
    probe_now = lambda step, params: (
        stab_fn(params, stab_x, jax.random.fold_in(stab_key, step)) if step in stab_steps else {}
    )
    batches = data.batches(ds, config.batch_size, config.seed, start_step=start)
    batch_iter = (jax.device_put(b, place.data) for b in batches)
    rec = config.record

    writer, scalars = records.MetricsWriter(workdir), live.Scalars(workdir, start)
    fetcher, progress = _Fetcher(workdir, writer, scalars), live.Progress(n_steps, start)
    try:
        if start == 0:
            init_metrics = {
                **analyzer.pattern_metrics(None, state.masks),
                **evaluate_now(state.params),
                **probe_now(0, state.params),
            }
            fetcher.add(0, init_metrics, state.masks)
            fetcher.flush(keep_last=False)
        with signals.StopFlag() as stop, jax.transfer_guard_device_to_host("disallow"):
            for step in range(start + 1, n_steps + 1):
                record = itstime(step, rec.every_steps, n_steps)
                state, metrics, masks = step_fns[record](state, next(batch_iter), probe)
                extra = probe_now(step, state.params)
                if itstime(step, config.eval_every_steps, n_steps):
                    extra = {**extra, **evaluate_now(state.params)}
                if record or extra:
                    metrics = {**metrics, **extra}
                    snap = masks if itstime(step, rec.snapshot_every_steps, n_steps) else None
                    fetcher.add(step, metrics, snap)
                stopping = stop.set  # read once: a signal may land during the flush
                save = itstime(step, config.checkpoint.every_steps, n_steps) or stopping
                if save or itstime(step, config.log_every_steps, n_steps):
                    progress.update(fetcher.flush(keep_last=not save))
                if save:
                    ckpt.save(step, state)
                if stopping:
                    raise Interrupted(step, stop.signum)
    except FloatingPointError as err:
        raise NonFinite(err, workdir, ckpt.steps()) from None
    finally:
        progress.close()
        writer.close()
        scalars.close()
        ckpt.close()
    report.write_run_summary(workdir)
    return fetcher.last_row
