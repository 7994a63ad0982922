"""The pure pieces of training: state, optimizer, train and eval steps, data-parallel placement.

``train_step(state, batch, probe)`` is a pure function: one optimizer update, then the monitor
(:func:`regime_jax.analyzer.pattern_monitor`): step sizes from the optimizer's updates and,
with ``record``, the probe set's packed patterns under the *post-update* parameters with flip
rates against the patterns carried in the state. :func:`make_step_fns` jits the two variants
(record or not) once each, donating the state. Nothing here touches files, signals or orbax:
a user's own loop can import this module alone.

Shape suffixes follow the package convention (:mod:`regime_jax`): ``B`` batch, ``K`` classes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from regime_jax import analyzer
from regime_jax.bitmask import Patterns
from regime_jax.models.adapt import Net, as_net

# loss_fn(logits, y) -> per-example losses [B]; the train loss is their mean.
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


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


def cross_entropy(logits_BxK: jax.Array, y_B: jax.Array) -> jax.Array:
    """The default loss: softmax cross-entropy with integer labels, per example."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxK, y_B)


def _is_classification(logits: jax.Array, y: jax.Array) -> bool:
    """Accuracy is reported only for integer labels with one logit per class (static)."""
    return jnp.issubdtype(y.dtype, jnp.integer) and logits.ndim == y.ndim + 1


def _monitor(net: Net, probe_x: Any) -> analyzer.PatternMonitor:
    return analyzer.pattern_monitor(net.preacts_fn, probe_x)


def probe_patterns(model: Any, params: Any, probe_x: Any) -> Patterns:
    """Packed ``z > 0`` of every ReLU layer on the probe inputs."""
    return analyzer.patterns_from_preacts(as_net(model).preacts_fn(params, probe_x)[1])


def create_train_state(
    model: Any, tx: optax.GradientTransformation, key: jax.Array, probe_x: Any
) -> TrainState:
    """Initial state; its masks are the probe patterns of the initial parameters (step 0)."""
    net = as_net(model)
    params = net.init(key, jax.tree.map(lambda a: a[:1], probe_x))
    monitor = _monitor(net, probe_x).init(params)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), monitor)


def _loss(params: Any, batch: Mapping[str, jax.Array], net: Net, loss_fn: LossFn):
    logits = net.apply(params, batch["x"])
    return loss_fn(logits, batch["y"]).mean(), logits


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    probe: Mapping[str, jax.Array],
    *,
    model: Any,
    tx: optax.GradientTransformation,
    record: bool,
    loss_fn: LossFn = cross_entropy,
) -> tuple[TrainState, dict[str, jax.Array], Patterns | None]:
    """One update, then the monitor: step sizes, and with ``record`` the post-update patterns."""
    net = as_net(model)
    (loss, logits), grads = jax.value_and_grad(_loss, has_aux=True)(
        state.params, batch, net, loss_fn
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    monitored, monitor = _monitor(net, probe["x"]).update(
        state.monitor, params, updates, patterns=record
    )
    metrics = {"train/loss": loss}
    if _is_classification(logits, batch["y"]):
        metrics["train/acc"] = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
    metrics |= monitored
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, monitor=monitor)
    return state, metrics, (monitor.masks if record else None)


def eval_step(
    params: Any, batch: Mapping[str, jax.Array], *, model: Any, loss_fn: LossFn = cross_entropy
) -> dict[str, jax.Array]:
    """Summed loss (and correct count) over a padded batch; ``w`` masks the padding."""
    logits = as_net(model).apply(params, batch["x"])
    w_B = batch["w"]
    sums = {"loss": jnp.sum(loss_fn(logits, batch["y"]) * w_B)}
    if _is_classification(logits, batch["y"]):
        sums["correct"] = jnp.sum((jnp.argmax(logits, -1) == batch["y"]) * w_B)
    return sums


def evaluate(eval_fn: Callable, params: Any, batches: list[dict[str, jax.Array]], n: int):
    """Device-side ``eval/loss`` (and ``eval/acc``) over the whole validation split."""
    sums = [eval_fn(params, b) for b in batches]
    out = {"eval/loss": sum(s["loss"] for s in sums) / n}
    if "correct" in sums[0]:
        out["eval/acc"] = sum(s["correct"] for s in sums) / n
    return out


def make_step_fns(
    model: Any, tx: optax.GradientTransformation, loss_fn: LossFn = cross_entropy
) -> dict[bool, Callable]:
    """The two jitted step variants, keyed by ``record``; each traces once."""
    net = as_net(model)
    return {
        record: jax.jit(
            functools.partial(train_step, model=net, tx=tx, record=record, loss_fn=loss_fn),
            donate_argnames="state",
        )
        for record in (False, True)
    }


def eval_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, sharding: Any = None
) -> list[dict[str, jax.Array]]:
    """A validation split as equal, zero-padded device batches (one compile).

    With a data-parallel ``sharding`` the batch size is rounded up to a multiple of the
    device count; the padding has weight 0.
    """
    n = len(y)
    size = min(batch_size, n)
    if sharding is not None:
        size = -(-size // sharding.num_devices) * sharding.num_devices
    out = []
    for start in range(0, n, size):
        idx = np.arange(start, start + size)
        w = (idx < n).astype(np.float32)
        idx = np.minimum(idx, n - 1)
        out.append(jax.device_put({"x": x[idx], "y": y[idx], "w": w}, sharding))
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
    def for_devices(cls, devices: int, sizes: Mapping[str, int]) -> Placement:
        """A mesh of ``devices`` local devices (0: all); ValueError naming the field if not."""
        available = jax.local_device_count()
        n = devices or available
        if n > available:
            raise ValueError(
                f"parallel.devices={n} but this process has {available} local device(s); "
                f"allowed values: 0 (all) .. {available}"
            )
        field = "parallel.devices" + ("" if devices else f" (0: all {n})")
        for name, size in sizes.items():
            if size % n:
                raise ValueError(
                    f"{name}={size} is not divisible by {field}={n}: each device takes an equal "
                    f"share; use a multiple of {n} or set parallel.devices"
                )
        if n == 1:
            return cls(None, None)
        mesh = jax.make_mesh(
            (n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.local_devices()[:n]
        )
        return cls(NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec()))
