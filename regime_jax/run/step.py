"""The pure pieces of training: state, optimizer, train and eval steps, data-parallel placement.

``train_step(state, batch, probe)`` is a pure function: one optimizer update, then the monitor
(:func:`regime_jax.analyzer.pattern_monitor`): step sizes from the optimizer's updates and,
with ``record``, the probe set's packed patterns under the *post-update* parameters with flip
rates against the patterns carried in the state. :func:`make_step_fns` jits the two variants
(record or not) once each, donating the state. :func:`train_chunk` runs ``T`` such steps in one
``lax.scan`` over stacked batches (``steps_per_call``); :func:`make_chunk_fn` jits it. Nothing
here touches files, signals or orbax: a user's own loop can import this module alone.

A model with a train mode (:class:`regime_jax.models.adapt.Modes`: a linen ``train`` /
``training`` / ``deterministic`` argument, an NNX module with Dropout or BatchNorm) is trained
in train mode, with step ``t``'s dropout key ``fold_in(rng, t)`` (``rng`` derived from the
run's key and carried in the state) and its BatchNorm statistics updated and carried in
:class:`ModelState`; evaluation, the monitor's probe forward and the stability test run it in
eval mode on the current statistics (:class:`StatefulTrainState`). Any other model has
exactly the :class:`TrainState`, programs and checkpoints it had before modes existed.

Shape suffixes follow the package convention (:mod:`regime_jax`): ``B`` batch, ``K`` classes,
``T`` steps of a chunk, ``S`` snapshot slots.
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
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from regime_jax import analyzer, gating
from regime_jax.bitmask import Patterns
from regime_jax.models.adapt import Net, as_net

# loss_fn(logits, y) -> per-example losses [B]; the train loss is their mean.
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


@struct.dataclass
class FrozenGates:
    """Decoupled training's part of the state (``decouple.*``, :mod:`regime_jax.gating`).

    Attributes:
      gates: a copy of the parameters at the freeze step F; from then on every ReLU unit's
        on/off comes from these (``z_values * [z_gates > 0]``) and they never change.
      masks: the gates' packed probe patterns (those of the parameters at F).
      step: F, int32; -1 until the run freezes (``gates`` and ``masks`` are then unused).
    """

    gates: Any
    masks: Patterns
    step: jax.Array

    @property
    def on(self) -> jax.Array:
        return self.step >= 0


@struct.dataclass
class GateCache:
    """What the cached frozen phase reads instead of running the gate network
    (:func:`regime_jax.gating.masked_net`): the frozen gates' packed patterns of every training
    example and of the probe set, and the training split itself, all on device, so a step
    takes only its batch's indices. A pure function of the gates and the data, so never
    checkpointed: built at the freeze and again on resume.

    Attributes:
      train: ``{layer: Packed [N_train, positions..., ceil(units / 8)]}``, row ``i`` the
        training example ``i`` (gathered by the batch's ``idx``).
      probe: ``{layer: Packed [P, ...]}``, the probe set in its order, every unit (the
        monitor's probe forward; ``FrozenGates.masks`` may be sampled).
      x, y: the training split's inputs ``[N_train, ...]`` and labels.
    """

    train: Patterns
    probe: Patterns
    x: jax.Array
    y: jax.Array

    @property
    def num_bytes(self) -> int:
        """Device bytes of the gate bits (training and probe examples)."""
        parts = (*self.train.values(), *self.probe.values())
        return sum(p.bits.size * p.bits.dtype.itemsize for p in parts)


@struct.dataclass
class ModelState:
    """A model with a train mode: its variables besides the trained params, and its RNG.

    Attributes:
      variables: what the model updates in train mode and reads in eval mode: linen's
        collections other than ``params`` (``{"batch_stats": ...}``), an NNX module's
        non-``Param``, non-RNG state (BatchNorm statistics); empty if none.
      rng: uint32 key data (``jax.random.key_data``) of the run's model RNG, derived from the
        run's key: step ``t`` (1-based) trains with the key ``fold_in(rng, t)``, so a resumed
        run draws the same dropout masks.
    """

    variables: Any
    rng: jax.Array


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; ``monitor`` holds the patterns of the last record.

    ``frozen`` is None unless the run may freeze its gates (``decouple.*``): a run without
    freezing has exactly the state (and the checkpoints) it had before decoupling existed.
    A model with a train mode gets :class:`StatefulTrainState` (this plus its
    :class:`ModelState`); any other keeps exactly this state, so its checkpoints, those
    written before train modes existed included, restore unchanged.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    monitor: analyzer.MonitorState
    frozen: FrozenGates | None = None

    @property
    def masks(self) -> Patterns:
        """Packed probe patterns at the last record step."""
        return self.monitor.masks


@struct.dataclass
class StatefulTrainState(TrainState):
    """A :class:`TrainState` with the :class:`ModelState` of a model with a train mode."""

    model_state: ModelState | None = None


def model_state_of(state: TrainState) -> ModelState | None:
    """The state's :class:`ModelState`, or None (a model without a train mode)."""
    return getattr(state, "model_state", None)


def step_decay_schedule(lr: float, warmup: int, num_steps: int) -> optax.Schedule:
    """``lr`` x 0.1 from step ``num_steps // 2`` on and x 0.01 from ``3 * num_steps // 4`` on
    (absolute steps, 0-based: the update at step t uses the rate at t), after a linear warmup
    from 0 over ``warmup`` steps as the constant schedule's.

    >>> s = step_decay_schedule(1.0, 0, 100)
    >>> [round(float(s(t)), 4) for t in (0, 49, 50, 74, 75, 99)]
    [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    """
    scales: dict[int, float] = {}
    for boundary in (num_steps // 2, 3 * num_steps // 4):  # equal for num_steps < 4: x0.01
        scales[boundary] = scales.get(boundary, 1.0) * 0.1
    decay = optax.piecewise_constant_schedule(lr, scales)
    if not warmup:
        return decay
    # join_schedules hands the second schedule count - warmup: the boundaries stay absolute
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), lambda count: decay(count + warmup)], [warmup]
    )


def make_optimizer(cfg: Mapping[str, Any], num_steps: int) -> optax.GradientTransformation:
    """SGD (momentum), Adam or AdamW with a constant, cosine or step-decay learning rate
    (optional warmup)."""
    lr, warmup = float(cfg["learning_rate"]), int(cfg.get("warmup_steps", 0))
    if cfg["schedule"] == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, num_steps)
    elif cfg["schedule"] == "step":
        schedule = step_decay_schedule(lr, warmup, num_steps)
    elif warmup:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    else:
        schedule = optax.constant_schedule(lr)
    if cfg["name"] == "sgd":
        return optax.sgd(schedule, momentum=float(cfg.get("momentum", 0.0)) or None)
    if cfg["name"] == "adamw":
        return optax.adamw(schedule, weight_decay=float(cfg.get("weight_decay", 1e-4)))
    return optax.adam(schedule)


def cross_entropy(logits_BxK: jax.Array, y_B: jax.Array) -> jax.Array:
    """The default loss: softmax cross-entropy with integer labels, per example.

    Sequence targets (``y [B, T]``, logits ``[B, T, K]``: next-token prediction) give each
    example the mean of its per-token cross-entropies, so the train loss (the mean over the
    batch) is the mean per-token loss.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BxK, y_B)
    if losses.ndim > 1:  # per token: each sequence's mean over its positions
        losses = losses.mean(axis=tuple(range(1, losses.ndim)))
    return losses


def _is_classification(logits: jax.Array, y: jax.Array) -> bool:
    """Accuracy is reported only for integer labels with one logit per class (static)."""
    return jnp.issubdtype(y.dtype, jnp.integer) and logits.ndim == y.ndim + 1


def _monitor(net: Net, probe_x: Any, options: MonitorOptions | None = None):
    """The monitor of ``net`` on ``probe_x``, with a config's :class:`MonitorOptions`."""
    return analyzer.pattern_monitor(
        net.preacts_fn, probe_x, **dataclasses.asdict(options or MonitorOptions())
    )


@dataclasses.dataclass(frozen=True)
class MonitorOptions:
    """How the step's monitor records (:func:`regime_jax.analyzer.pattern_monitor`'s options;
    static, hashable). From a config: :func:`monitor_options_of`.

    Attributes:
      probe_chunk: probe examples per chunk of the probe forward: an int, "auto" or None.
      sample_units, sample_positions: record a fixed random subset per layer (None: all).
      sample_seed: which subset.
    """

    probe_chunk: int | str | None = "auto"
    sample_units: int | None = None
    sample_positions: int | None = None
    sample_seed: int = 0


def monitor_options_of(config: Any) -> MonitorOptions:
    """A config's ``record.probe_chunk`` (0: "auto") and ``record.sample_*`` (0: all)."""
    r = config.record
    chunk = r.get("probe_chunk", 0)
    return MonitorOptions(
        probe_chunk="auto" if chunk == 0 else chunk,
        sample_units=r.get("sample_units", 0) or None,
        sample_positions=r.get("sample_positions", 0) or None,
        sample_seed=r.get("sample_seed", 0),
    )


def monitor_sample(model: Any, variables: Any, probe_x: Any, options: MonitorOptions) -> dict:
    """The units and positions a sampled monitor records, ``{layer: {"units": [k] | None,
    "positions": [m] | None}}`` (:func:`regime_jax.analyzer.sample_indices`)."""
    return _monitor(as_net(model), probe_x, options).update.sample(variables)


def model_variables(model: Any, state: TrainState) -> Any:
    """What the model's ``apply`` / ``preacts_fn`` take: ``state.params``, or for a model with a
    train mode the params joined with its :class:`ModelState` variables (eval mode)."""
    model_state = model_state_of(state)
    if model_state is None:
        return state.params
    return as_net(model).modes.join(state.params, model_state.variables)


def probe_patterns(model: Any, params: Any, probe_x: Any, monitor_options=None) -> Patterns:
    """Packed ``z > 0`` of every ReLU layer on the probe inputs, as the monitor records them
    (chunked, sampled: :class:`MonitorOptions`)."""
    return _monitor(as_net(model), probe_x, monitor_options).init(params).masks


def _key_data(key: jax.Array) -> jax.Array:
    """uint32 key data (what a checkpoint stores) of a typed or a raw PRNG key."""
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    return jax.random.key_data(key) if typed else key


def _copy(tree: Any) -> Any:
    """Fresh buffers (never the same array twice in a donated state)."""
    return jax.tree.map(jnp.copy, tree)


def create_train_state(
    model: Any,
    tx: optax.GradientTransformation,
    key: jax.Array,
    probe_x: Any,
    *,
    decoupled: bool = False,
    monitor_options: MonitorOptions | None = None,
) -> TrainState:
    """Initial state; its masks are the probe patterns of the initial parameters (step 0).

    With ``decoupled`` the state has room for the gates (:class:`FrozenGates`, not yet frozen).
    A model with a train mode is initialised in eval mode; its other variables and an RNG
    derived from ``key`` go to :class:`ModelState` (not with ``decoupled``: ValueError).
    """
    net = as_net(model)
    x1 = jax.tree.map(lambda a: a[:1], probe_x)
    model_state = None
    if net.modes is None:
        params = net.init(key, x1)
        monitor = _monitor(net, probe_x, monitor_options).init(params)
    else:
        if decoupled:
            raise ValueError(
                f"gate freezing needs a model without a train mode; this one sets its mode with "
                f"{net.modes.flag!r}"
            )
        params, variables = net.modes.init(key, x1)
        model_state = ModelState(variables, _key_data(jax.random.fold_in(key, 1)))
        joined = net.modes.join(params, variables)
        monitor = _monitor(net, probe_x, monitor_options).init(joined, params=params)
    frozen = None
    if decoupled:
        frozen = FrozenGates(_copy(params), _copy(monitor.masks), jnp.full((), -1, jnp.int32))
    fields = (jnp.zeros((), jnp.int32), params, tx.init(params), monitor, frozen)
    if model_state is None:
        return TrainState(*fields)
    return StatefulTrainState(*fields, model_state)


def freeze(
    state: TrainState, probe_x: Any, *, model: Any, monitor_options: MonitorOptions | None = None
) -> TrainState:
    """The state with its gates frozen now: a copy of the params, their probe patterns, F."""
    if state.frozen is None:
        raise ValueError("freeze needs a state made with create_train_state(..., decoupled=True)")
    masks = probe_patterns(model, state.params, probe_x, monitor_options)
    return state.replace(frozen=FrozenGates(_copy(state.params), masks, state.step))


def _loss(params: Any, batch: Mapping[str, jax.Array], apply: Callable, loss_fn: LossFn):
    logits = apply(params, batch["x"])
    return loss_fn(logits, batch["y"]).mean(), logits


def _train_mode_loss(params, variables, key, batch, train: Callable, loss_fn: LossFn):
    """The loss in train mode: ``(loss, (logits, updated variables))``."""
    logits, variables = train(params, variables, batch["x"], key)
    return loss_fn(logits, batch["y"]).mean(), (logits, variables)


def _under_gates(gated_net: gating.GatedNet, gates: Any) -> Net:
    """The value network under fixed gates, as a Net of the values (init unused)."""
    return Net(
        None,
        lambda values, x: gated_net.apply(values, gates, x),
        lambda values, x: gated_net.preacts_fn(values, gates, x)[:2],
    )


def _under_masks(masked_net: gating.MaskedNet, cache: GateCache, idx_B: jax.Array) -> Net:
    """The value network under cached gate bits: ``apply`` on the batch (its rows of
    ``cache.train``), ``preacts_fn`` on ``{"x": probe_x, "bits": probe bits}`` (what the
    monitor chunks, rows together)."""
    bits_B = jax.tree.map(lambda b: b[idx_B], cache.train)
    return Net(
        None,
        lambda values, x: masked_net.apply(values, bits_B, x),
        lambda values, xb: masked_net.preacts_fn(values, xb["bits"], xb["x"]),
    )


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    probe: Mapping[str, Any],
    *,
    model: Any,
    tx: optax.GradientTransformation,
    record: bool,
    loss_fn: LossFn = cross_entropy,
    gated_net: gating.GatedNet | None = None,
    monitor_options: MonitorOptions | None = None,
    masked_net: gating.MaskedNet | None = None,
) -> tuple[TrainState, dict[str, jax.Array], Patterns | None]:
    """One update, then the monitor: step sizes, and with ``record`` the post-update patterns.

    With ``gated_net`` (the model's :func:`regime_jax.gating.gated_net`; a state frozen by
    :func:`freeze`) the update trains the values through the gated network; the recorded
    patterns are the value stream's own ``z_values > 0``, and the metrics add
    ``decouple/freeze_step`` and, with ``record``, ``decouple/disagree/*`` (those patterns
    against the gates').

    A :class:`StatefulTrainState` (a model with a train mode) computes the loss in train
    mode with the key ``fold_in(rng, t)`` of step ``t`` and keeps the variables it updates
    (BatchNorm statistics); the monitor then reads the model in eval mode on the new params
    and statistics, and takes step sizes of the params alone.

    With ``masked_net`` as well (the cached frozen phase), ``probe["cache"]`` is the
    :class:`GateCache` and the batch is ``{"idx": [B]}``, its training-example indices: its
    inputs, labels and gate bits are gathered on device, and the step is the gated step's
    maths with no gate forward, on the batch and on the probe set.
    """
    probe_x = probe["x"]
    if masked_net is not None:
        cache, idx_B = probe["cache"], batch["idx"]
        batch = {"x": cache.x[idx_B], "y": cache.y[idx_B]}
        net = _under_masks(masked_net, cache, idx_B)
        probe_x = {"x": probe_x, "bits": cache.probe}
    elif gated_net is not None:
        net = _under_gates(gated_net, state.frozen.gates)
    else:
        net = as_net(model)
    model_state = model_state_of(state)
    if model_state is None:
        (loss, logits), grads = jax.value_and_grad(_loss, has_aux=True)(
            state.params, batch, net.apply, loss_fn
        )
    else:  # train mode: this step's key, the statistics it updates
        key = jax.random.fold_in(jax.random.wrap_key_data(model_state.rng), state.step + 1)
        (loss, (logits, variables)), grads = jax.value_and_grad(_train_mode_loss, has_aux=True)(
            state.params, model_state.variables, key, batch, net.modes.train, loss_fn
        )
        model_state = model_state.replace(variables=variables)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    now = params if model_state is None else net.modes.join(params, model_state.variables)
    monitored, monitor = _monitor(net, probe_x, monitor_options).update(
        state.monitor, now, updates, patterns=record
    )
    metrics = {"train/loss": loss}
    if _is_classification(logits, batch["y"]):
        metrics["train/acc"] = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
    metrics |= monitored
    if gated_net is not None or masked_net is not None:
        metrics["decouple/freeze_step"] = state.frozen.step
        if record:
            metrics |= gating.disagreement_of_patterns(monitor.masks, state.frozen.masks)
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, monitor=monitor)
    if model_state is not None:
        state = state.replace(model_state=model_state)
    return state, metrics, (monitor.masks if record else None)


def eval_step(
    params: Any,
    batch: Mapping[str, jax.Array],
    *,
    model: Any,
    loss_fn: LossFn = cross_entropy,
    gates: Any = None,
    gated_net: gating.GatedNet | None = None,
) -> dict[str, jax.Array]:
    """Summed loss (and correct count) over a padded batch; ``w`` masks the padding.

    Sequence targets (``y [B, T]``): an example's "correct" is its token accuracy, so
    ``eval/acc`` is the accuracy over every validation token (sequences have equal lengths).

    ``params``: what the model's ``apply`` takes (:func:`model_variables`: a model with a
    train mode is evaluated in eval mode on its current variables). With ``gated_net`` and
    ``gates``: the gated network's (the values under frozen gates).
    """
    net = as_net(model) if gated_net is None else _under_gates(gated_net, gates)
    logits = net.apply(params, batch["x"])
    w_B = batch["w"]
    sums = {"loss": jnp.sum(loss_fn(logits, batch["y"]) * w_B)}
    if _is_classification(logits, batch["y"]):
        hit = jnp.argmax(logits, -1) == batch["y"]
        if hit.ndim > 1:  # sequence targets: each example's token accuracy
            hit = hit.mean(axis=tuple(range(1, hit.ndim)))
        sums["correct"] = jnp.sum(hit * w_B)
    return sums


def evaluate(eval_fn: Callable, params: Any, batches: list[dict[str, jax.Array]], n: int):
    """Device-side ``eval/loss`` (and ``eval/acc``) over the whole validation split."""
    sums = [eval_fn(params, b) for b in batches]
    out = {"eval/loss": sum(s["loss"] for s in sums) / n}
    if "correct" in sums[0]:
        out["eval/acc"] = sum(s["correct"] for s in sums) / n
    return out


@jax.tree_util.register_pytree_node_class
class MetricStack:
    """A step's (or a chunk's) metrics as one array per dtype and shape: the host call
    returns and the host fetches a few buffers instead of one per metric (~30 on the main
    job), the values bit for bit (each array is its metrics stacked on a new last axis).

    :meth:`pack` runs inside jit; :meth:`unpack` gives the metrics dict back after
    ``jax.device_get`` (a leaf of shape ``s`` comes back as ``array[..., j]``, shape ``s``).

    >>> m = {"a": jnp.float32(0.5), "n": jnp.int32(3), "b": jnp.float32(2.0)}
    >>> stack = MetricStack.pack(m)
    >>> len(stack.arrays), sorted(stack.keys())
    (2, ['a', 'b', 'n'])
    >>> {k: v.item() for k, v in jax.device_get(stack).unpack().items()}
    {'a': 0.5, 'b': 2.0, 'n': 3}
    """

    def __init__(self, arrays: tuple, layout: tuple):
        self.arrays, self.layout = tuple(arrays), layout  # layout: (treedef, leaf indices)

    def tree_flatten(self):
        return self.arrays, self.layout

    @classmethod
    def tree_unflatten(cls, layout, arrays):
        return cls(arrays, layout)

    @classmethod
    def pack(cls, metrics: Mapping[str, Any]) -> MetricStack:
        leaves, treedef = jax.tree.flatten(metrics)
        groups: dict[tuple, list[int]] = {}
        for i, leaf in enumerate(leaves):
            groups.setdefault((jnp.result_type(leaf).name, jnp.shape(leaf)), []).append(i)
        arrays = tuple(jnp.stack([leaves[i] for i in idx], axis=-1) for idx in groups.values())
        return cls(arrays, (treedef, tuple(tuple(idx) for idx in groups.values())))

    def keys(self) -> frozenset[str]:
        treedef = self.layout[0]
        return frozenset(jax.tree.unflatten(treedef, [0] * treedef.num_leaves))

    def unpack(self) -> dict[str, Any]:
        treedef, groups = self.layout
        leaves: list[Any] = [None] * treedef.num_leaves
        for array, idx in zip(self.arrays, groups, strict=True):
            for j, i in enumerate(idx):
                leaves[i] = array[..., j]
        return jax.tree.unflatten(treedef, leaves)


def _stacked(fn: Callable) -> Callable:
    """``fn`` (returning ``(state, metrics, rest)``) with its metrics as a :class:`MetricStack`."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        state, metrics, rest = fn(*args, **kwargs)
        return state, MetricStack.pack(metrics), rest

    return wrapped


def make_step_fns(
    model: Any,
    tx: optax.GradientTransformation,
    loss_fn: LossFn = cross_entropy,
    out_shardings: Any = None,
    gated_net: gating.GatedNet | None = None,
    monitor_options: MonitorOptions | None = None,
    masked_net: gating.MaskedNet | None = None,
    stack_metrics: bool = False,
) -> dict[bool, Callable]:
    """The two jitted step variants, keyed by ``record``; each traces once.

    ``out_shardings`` (a mesh's replicated sharding, or None) pins every output: the state
    comes back as it went in, and metrics and masks are readable from any process. With
    ``gated_net``, the steps of a frozen state (:func:`train_step`). ``stack_metrics``: the
    metrics come back as a :class:`MetricStack` (the loop's form: few buffers per call).
    """
    net = as_net(model)
    kwargs = {} if out_shardings is None else {"out_shardings": out_shardings}
    wrap = _stacked if stack_metrics else (lambda fn: fn)
    return {
        record: jax.jit(
            wrap(
                functools.partial(
                    train_step,
                    model=net,
                    tx=tx,
                    record=record,
                    loss_fn=loss_fn,
                    gated_net=gated_net,
                    monitor_options=monitor_options,
                    masked_net=masked_net,
                )
            ),
            donate_argnames="state",
            **kwargs,
        )
        for record in (False, True)
    }


def _step_either(state, batch, probe, record, step_fn):
    """One step whose ``record`` is traced: a ``lax.cond``; a non-record step's pattern
    metrics are zeros (the host drops them), so both branches have one structure."""
    rec = lambda s: step_fn(s, batch, probe, record=True)[:2]
    like = jax.eval_shape(rec, state)[1]

    def norec(s):
        s, metrics, _ = step_fn(s, batch, probe, record=False)
        return s, {
            k: metrics[k] if k in metrics else jnp.zeros(v.shape, v.dtype) for k, v in like.items()
        }

    return lax.cond(record, rec, norec, state)


def train_chunk(
    state: TrainState,
    batch_TxB: Mapping[str, jax.Array],
    probe: Mapping[str, jax.Array],
    record_T: jax.Array,
    slot_T: jax.Array,
    *,
    model: Any,
    tx: optax.GradientTransformation,
    loss_fn: LossFn = cross_entropy,
    every_record: bool,
    slots: int,
    gated_net: gating.GatedNet | None = None,
    monitor_options: MonitorOptions | None = None,
    masked_net: gating.MaskedNet | None = None,
) -> tuple[TrainState, dict[str, jax.Array], Patterns]:
    """``T`` consecutive :func:`train_step` calls in one ``lax.scan``.

    Args:
      batch_TxB: the chunk's batches stacked on a leading step axis ``[T, B, ...]``.
      record_T: bool ``[T]``, which steps record patterns; ignored (all record) with
        ``every_record``, else each step is a ``lax.cond`` so a non-record step does no probe
        work.
      slot_T: int32 ``[T]``, the snapshot slot (``0..slots-1``) a step's masks go to, or
        ``slots`` for none.

    Returns:
      ``(state, metrics_T, snapshots_S)``: every metric stacked ``[T]`` (a non-record step's
      pattern metrics are zeros), and ``{layer: Packed [S, P, ...]}`` holding only the masks
      of the snapshot steps, not ``T`` full mask sets. ``gated_net``: as in :func:`train_step`
      (a chunk never straddles the freeze step).
    """
    step_fn = functools.partial(
        train_step,
        model=model,
        tx=tx,
        loss_fn=loss_fn,
        gated_net=gated_net,
        monitor_options=monitor_options,
        masked_net=masked_net,
    )
    snaps_S = jax.tree.map(lambda a: jnp.zeros((slots, *a.shape), a.dtype), state.masks)

    def body(carry, xs):
        state, snaps_S = carry
        batch, record, slot = xs
        if every_record:
            state, metrics, _ = step_fn(state, batch, probe, record=True)
        else:
            state, metrics = _step_either(state, batch, probe, record, step_fn)
        put = lambda buf, m: buf.at[slot].set(m, mode="drop")  # slot == slots: dropped
        return (state, jax.tree.map(put, snaps_S, state.masks)), metrics

    (state, snaps_S), metrics_T = lax.scan(body, (state, snaps_S), (batch_TxB, record_T, slot_T))
    return state, metrics_T, snaps_S


def make_chunk_fn(
    model: Any,
    tx: optax.GradientTransformation,
    loss_fn: LossFn = cross_entropy,
    *,
    every_record: bool,
    slots: int,
    out_shardings: Any = None,
    gated_net: gating.GatedNet | None = None,
    monitor_options: MonitorOptions | None = None,
    masked_net: gating.MaskedNet | None = None,
    stack_metrics: bool = False,
) -> Callable:
    """:func:`train_chunk` jitted, donating the state; one trace per chunk length ``T``.
    ``stack_metrics``: ``metrics_T`` as a :class:`MetricStack` of ``[T, n]`` arrays."""
    kwargs = {} if out_shardings is None else {"out_shardings": out_shardings}
    wrap = _stacked if stack_metrics else (lambda fn: fn)
    fn = functools.partial(
        train_chunk,
        model=as_net(model),
        tx=tx,
        loss_fn=loss_fn,
        every_record=every_record,
        slots=slots,
        gated_net=gated_net,
        monitor_options=monitor_options,
        masked_net=masked_net,
    )
    return jax.jit(wrap(fn), donate_argnames="state", **kwargs)


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

    ``chunk`` shards a chunk's stacked batches ``[T, B, ...]`` on their batch axis. With one
    device all are None (the default device, no sharding annotations), so a 1-device run
    compiles exactly the program it did before meshes existed: same bytes. With several
    processes (:mod:`regime_jax.run.hosts`) the mesh spans every process's devices.
    """

    data: NamedSharding | None
    replicated: NamedSharding | None
    chunk: NamedSharding | None = None

    @classmethod
    def for_devices(cls, devices: int, sizes: Mapping[str, int]) -> Placement:
        """A mesh of ``devices`` devices (0: all); ValueError naming the field if not."""
        n, pool = _mesh_devices(devices)
        field = "parallel.devices" + ("" if devices else f" (0: all {n})")
        for name, size in sizes.items():
            if size % n:
                raise ValueError(
                    f"{name}={size} is not divisible by {field}={n}: each device takes an equal "
                    f"share; use a multiple of {n} or set parallel.devices"
                )
        if n == 1:
            return cls(None, None, None)
        mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=pool[:n])
        spec = lambda *axes: NamedSharding(mesh, PartitionSpec(*axes))
        return cls(spec("data"), spec(), spec(None, "data"))


def _mesh_devices(devices: int) -> tuple[int, list]:
    """How many devices the mesh takes, and from which list (this process's, or all)."""
    if jax.process_count() > 1:  # every process must take part in every computation
        total = jax.device_count()
        if devices not in (0, total):
            raise ValueError(
                f"parallel.devices={devices} with {jax.process_count()} processes; allowed "
                f"values: 0 or {total} (the mesh spans every process's devices)"
            )
        return total, jax.devices()
    available = jax.local_device_count()
    n = devices or available
    if n > available:
        raise ValueError(
            f"parallel.devices={n} but this process has {available} local device(s); "
            f"allowed values: 0 (all) .. {available}"
        )
    return n, jax.local_devices()
