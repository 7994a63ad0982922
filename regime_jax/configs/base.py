"""The config schema shared by every experiment, and its validation.

A config module (``regime_jax/configs/<name>.py``, or a file of your own) defines
``get_config(arg=None)`` that starts from :func:`base_config` and overrides fields.
:func:`validate_config` runs before any data is loaded or any array is computed; every error
names the field and the allowed values. Every numeric field has an upper bound too (the
``*_MAX`` constants below, each with its reason), so a value the machine cannot honour
(``num_steps=99999999999999999999``) is refused in one line before anything is allocated in
proportion to it or written.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
from ml_collections import config_dict

from regime_jax import registry
from regime_jax.registry import CUSTOM

OPTIMIZERS = ("adam", "adamw", "sgd")
# Fields added after runs were recorded, each with the value that does what a run without the
# field did: resuming, extending or skipping a run recorded before the field existed compares
# equal at that value (records.config_diff's `added`) and differs at any other.
ADDED_FIELDS = {
    "model.compute_dtype": "float32",
    "record.sample_units": 0,
    "record.sample_positions": 0,
    "record.sample_seed": 0,
    "record.activations": ("relu",),
    "optimizer.weight_decay": 1e-4,  # read by adamw alone, which came with it
    "dataset.label_noise": 0.0,
}
# record.activations: the functions whose pre-activation signs are recorded (capture_relus's
# activations=; equal to regime_jax.capture.ACTIVATIONS, tested).
ACTIVATIONS = ("relu", "leaky_relu", "gelu", "silu", "swish", "elu")
CUSTOM_MODEL = CUSTOM  # model.name of a run given a model object, not a registry name
SCHEDULES = ("constant", "cosine", "step")


class ConfigError(ValueError):
    """A config field has a value regime_jax cannot run with."""


def _activations(c: ml_collections.ConfigDict) -> None:
    """record.activations: a non-empty tuple from ACTIVATIONS, holding model.activation."""
    acts = c.record.get("activations", ADDED_FIELDS["record.activations"])
    if (
        isinstance(acts, str)
        or not isinstance(acts, tuple | list)
        or not acts
        or any(a not in ACTIVATIONS for a in acts)
    ):
        raise ConfigError(
            f"record.activations={acts!r}; allowed values: a non-empty tuple of {list(ACTIVATIONS)}"
        )
    activation = c.model.get("activation", "relu")
    if isinstance(activation, str) and activation in ACTIVATIONS:
        wanted = {"swish": "silu"}.get(activation, activation)
        if wanted not in {{"swish": "silu"}.get(a, a) for a in acts}:
            raise ConfigError(
                f"record.activations={tuple(acts)!r} must include model.activation="
                f"{activation!r}, else the model's units are not recorded"
            )


def base_config() -> ml_collections.ConfigDict:
    """Defaults for every field (the main job: an MLP on MNIST-1D with SGD + momentum).

    Every packaged config (``regime_jax.configs``) starts here. The defaults are literals, so
    building a config imports no implementation module; the ``stability`` and ``timescales``
    blocks equal ``stability.StabilityConfig()`` and ``timescales.DecayConfig()`` (tested).
    """
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init and batch order: the only seed a sweep varies
    c.dataset = dict(
        # mnist1d | digits | synthetic_text (offline); mnist | fashion_mnist | cifar10 |
        # tiny_shakespeare (tfds)
        name="mnist1d",
        num_samples=5000,  # mnist1d only: examples generated (80% train, 20% validation)
        label_noise=0.0,  # fraction of training labels set to another seeded random class; [0, 1)
        seed=42,  # mnist1d: the generator's seed; digits: the split's; unused by tfds
        # A typed placeholder, so that it can be set from the command line.
        data_dir=config_dict.placeholder(str),  # tfds only: prepared datasets; None: tfds's own
        download=True,  # tfds only: download a dataset missing from data_dir
    )
    # The fixed probe set whose activation patterns are recorded: `size` validation examples
    # chosen once by `seed`, sorted, never shuffled.
    c.probe = dict(
        size=512,  # validation examples whose patterns are recorded (the probe set)
        seed=0,  # which validation examples form the probe set
    )
    # A registry name (regime_jax.models.MODELS) and its fields.
    c.model = dict(
        name="mlp",  # mlp | cnn | transformer | resnet | gpt, or one added with register_model
        hidden=(256, 256),  # mlp: hidden layer widths, recorded as fc1 .. fcN
        activation="relu",  # relu; transformer also gelu | silu (with record.activations)
        compute_dtype="float32",  # float32 | bfloat16 (bf16 compute, f32 params; bits of bf16 z)
    )
    c.optimizer = dict(
        name="sgd",  # sgd (with momentum) | adam | adamw (adam with decoupled weight decay)
        learning_rate=0.05,  # peak learning rate
        momentum=0.9,  # sgd only; 0 = plain SGD
        schedule="constant",  # constant | cosine (to 0 at num_steps) | step (x0.1 at 50%, 75%)
        weight_decay=1e-4,  # adamw only: optax.adamw's weight_decay (decoupled); >= 0
        warmup_steps=0,  # linear warmup from 0, below num_steps
    )
    c.batch_size = 128  # training examples per step
    c.num_steps = 3000  # optimizer steps
    # What is written to metrics.jsonl and masks/, and how often.
    c.record = dict(
        every_steps=1,  # steps between pattern records (flip/*, dead/*, always_on/*, step/*)
        snapshot_every_steps=100,  # steps between packed mask snapshots (a multiple of every_steps)
        probe_chunk=0,  # probe examples per chunk of the probe forward; 0: auto (<=64 MiB preacts)
        sample_units=0,  # record only this many random units per layer (flip_se/*); 0: all
        sample_positions=0,  # ... and this many random positions (tokens, pixels); 0: all
        sample_seed=0,  # which units and positions are sampled (written to sample.json)
        # Functions whose pre-activation sign z > 0 is recorded: relu (default) | leaky_relu |
        # gelu | silu | swish | elu (opt-in; keys end in :gelu etc.), a tuple.
        activations=("relu",),
    )
    c.log_every_steps = 100  # steps between host fetches of the metrics (and progress lines)
    c.eval_every_steps = 100  # steps between eval/loss, eval/acc on the whole validation split
    c.eval_batch_size = 1000  # validation examples per eval forward pass
    c.overwrite = False  # start afresh in a workdir that already holds a run
    # Data parallelism: the batch and the probe set are sharded over local devices on a "data"
    # mesh axis (parameters replicated).
    c.parallel = dict(
        devices=0,  # local devices to shard the batch and the probe set over; 0 = all of them
    )
    # Training steps per host call: K steps run in one jitted lax.scan over K stacked batches;
    # a chunk ends early at eval, stability-probe and checkpoint steps (README "Scale").
    c.steps_per_call = 1  # training steps per host call (one jitted lax.scan); 1: one step
    # Orbax checkpoints of the train state under checkpoints/; a rerun resumes from the newest.
    c.checkpoint = dict(
        every_steps=500,  # steps between checkpoints; 0: only at the end (and on Ctrl-C)
        keep=3,  # how many of the newest checkpoints to keep
    )
    # Finite-difference stability test during training (regime_jax.stability): at step 0,
    # the last step and num_points log-spaced steps between. The fields after `seed` are
    # stability.StabilityConfig's, with its defaults.
    c.stability = dict(
        num_points=0,  # log-spaced steps tested besides the first and last; 0: no test
        num_examples=0,  # the first num_examples examples of the probe set (<= probe.size; 0: all)
        seed=0,  # seed of the random directions
        num_directions=16,  # random unit directions (per layer if per_layer)
        min_radius=1e-6,  # smallest tested radius (parameter-space L2 norm)
        max_radius=1.0,  # largest tested radius
        num_radii=12,  # log-spaced coarse radii, min_radius .. max_radius
        refine=0,  # extra fine radii between coarse ones, for the breaking radii
        per_layer=False,  # directions in one top-level parameter subtree at a time
        radius_batch=4,  # radii evaluated together (bounds memory); None: all at once
    )
    # Decoupled training (regime_jax.gating): from the freeze step F on, every ReLU's on/off
    # comes from a frozen copy of the parameters at F (the gates) and the parameters (the
    # values) train through the gated network, evaluation included (README "Decoupling").
    c.decouple = dict(
        freeze_step=-1,  # F, the step after which gates freeze; -1 (or >= num_steps): never
        auto=False,  # freeze when the online settle detector triggers on flip/all (not with F)
        check_every_steps=50,  # auto: F is the first multiple of this at/after the trigger
        # The frozen phase's path: "auto" caches every training example's gate bits at the
        # freeze (1 bit per unit per example, on device) and trains the values alone under
        # them, no gate forward (same maths); it falls back to running the gate network when
        # the cache and the training split (on device with it) would exceed 512 MiB, or a ReLU
        # sits inside a scan. "off": always the gates.
        cache="auto",
        # auto: the detector (online.OnlineConfig): trailing mean over `window` recorded
        # points <= fraction x its running peak for `patience` consecutive points.
        online=dict(
            window=25,  # recorded points in the trailing mean of flip/all
            fraction=0.1,  # triggers below this fraction of the mean's running peak
            patience=10,  # ... for this many consecutive recorded points
        ),
    )
    # Decay-time analysis of the recorded series (timescales.DecayConfig's fields and
    # defaults; the rules' formulas are in regime_jax/analysis/timescales.py).
    c.timescales = dict(
        rule="settle",  # the main rule: settle | cumsum | threshold | fraction (all reported)
        window=25,  # centered moving-average width (points) before any rule; >= 1
        delta=0.1,  # settle: band half-width, a fraction of the smoothed range; (0, 1)
        final_fraction=0.1,  # trailing fraction of points: the final level; (0, 0.5]
        cumsum_fraction=0.9,  # cumsum: fraction of the total mass reached at T; (0, 1)
        threshold_fraction=0.1,  # threshold: fraction of the start level reached at T; (0, 1)
        min_points=20,  # a series with fewer points is reported too_short; >= 2
        fraction=math.exp(-1.0),  # fraction rule: f of the start level (1/e: tau); (0, 1)
        min_drop=0.5,  # decay test: (start - final) / start must reach this; [0, 1)
        min_snr=5.0,  # decay test: (start - final) / its noise std error must reach this; >= 0
        max_final_drift=0.02,  # still_decaying: last segment fell > this x the drop; (0, 1)
        budget_fraction=0.9,  # flag a ratio budget-bound if T(step) is past this of the run; (0, 1]
    )
    return c


def smoke(c: ml_collections.ConfigDict, num_steps: int, probe_size: int, batch_size=None) -> None:
    """Shrinks ``c`` in place to an experiment's ``:quick`` smoke run (a few seconds).

    Logs every 10 steps; evaluates and snapshots masks at the middle and the end.
    """
    c.num_steps, c.probe.size = num_steps, probe_size
    c.log_every_steps = 10
    c.eval_every_steps = c.record.snapshot_every_steps = num_steps // 2
    if batch_size is not None:
        c.batch_size = batch_size


def get_field(c: ml_collections.ConfigDict, field: str) -> Any:
    """The value at dotted ``field`` (``"optimizer.name"``)."""
    for part in field.split("."):
        c = c[part]
    return c


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{field}={value!r} is unknown; allowed values: {sorted(allowed)}")


def _positive(field: str, value: Any, kind: type = int, high: int | None = None) -> None:
    ok = isinstance(value, kind | int) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not value > 0:
        finite = ", finite" if kind is float else ""
        allowed = "" if high is None else f"; allowed values: an int >= 1 and <= {high}"
        raise ConfigError(f"{field}={value!r} must be a positive{finite} {kind.__name__}{allowed}")


SEED_MAX = 2**32 - 1  # numpy's legacy seeding (mnist1d) takes 32-bit seeds

# Upper bounds: what the machine can honour. Checked before any data is loaded.
# The train state's step counter and the freeze step are int32 (max 2**31 - 1 = 2.1e9), and a
# chunk's steps are counted past num_steps; 10**9 leaves that margin.
STEPS_MAX = 10**9
# Steps a run lists in memory or writes a row for: metric rows (record and eval steps,
# stability-probe steps; load_run and the report hold every row, ~2 KB each in Python, so
# 10**6 rows are ~2 GB), and the chunk boundaries (eval, checkpoint and decouple check
# steps) the loop lists up front. num_steps / cadence must stay within this.
EVENTS_MAX = 10**6
# Example counts (batch, probe, eval batch): JAX indexes an axis with int32 by default. The
# real bounds (the split sizes) are checked once the data is loaded, before any write.
SIZE_MAX = 2**31 - 1
# MNIST-1D is generated one example at a time (~0.2 ms each, float64): 10**6 examples take
# minutes and ~0.3 GB; more is not an experiment this generator serves.
NUM_SAMPLES_MAX = 10**6
# K batches are stacked to [K, B, ...] on the host and the device per chunk, and up to
# 1 + log2 K scan lengths are compiled; the gain is flat well before K=4096
# (experiments/bench_throughput.py measures 1, 8, 32).
STEPS_PER_CALL_MAX = 4096
# No host has more local devices; the real bound (the devices JAX sees) is checked when the
# data is placed, before any write.
DEVICES_MAX = 2**16
# Stability test loop counts: each (direction, radius) is a forward pass of the probe set,
# radius_batch x num_directions of them at once; the radii grid has num_radii x (refine + 1)
# points. Far beyond a useful test, and the grid stays ~10**6 floats.
STABILITY_COUNT_MAX = 4096
# Parameters are float32: a learning rate or radius above float32's largest finite value
# (3.4e38) is inf in the update or in theta + eps u.
FLOAT32_MAX = 3.4028234663852886e38


def _seed(field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= SEED_MAX:
        raise ConfigError(f"{field}={value!r} must be an int in 0..{SEED_MAX}")


def _bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} must be True or False")


def _cadence(field: str, value: Any, num_steps: int) -> None:
    _positive(field, value)
    if value > num_steps:
        raise ConfigError(
            f"{field}={value} is larger than num_steps={num_steps}; allowed values: 1..{num_steps}"
        )


def _int_in(field: str, value: Any, low: int, high: int, note: str = "") -> None:
    """ConfigError unless ``value`` is an int (not a bool) in ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{field}={value!r}; allowed values: an int >= {low} and <= {high}{note}")


def _at_most(field: str, value: Any, high: int | float, note: str = "") -> None:
    """ConfigError if ``value`` is a number above ``high`` (other checks say what else is wrong)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > high:
        shown = high if isinstance(high, int) else f"{high:g}"
        raise ConfigError(f"{field}={value!r} is too large; allowed values: at most {shown}{note}")


def _events(field: str, every: Any, num_steps: int) -> None:
    """ConfigError if a cadence ``every`` lists more than EVENTS_MAX steps of the run."""
    if isinstance(every, int) and every > 0 and num_steps // every > EVENTS_MAX:
        least = -(-num_steps // EVENTS_MAX)
        raise ConfigError(
            f"{field}={every} with num_steps={num_steps} gives {num_steps // every} such steps; "
            f"allowed values: at most {EVENTS_MAX} per run, so {field} >= {least} (or a lower "
            f"num_steps)"
        )


def _dataset_fields(d: ml_collections.ConfigDict) -> None:
    _int_in("dataset.num_samples", d.num_samples, 1, NUM_SAMPLES_MAX)
    if d.data_dir is not None and not (isinstance(d.data_dir, str) and d.data_dir):
        raise ConfigError(f"dataset.data_dir={d.data_dir!r} must be a path or None")
    _bool("dataset.download", d.download)
    noise = d.get("label_noise", ADDED_FIELDS["dataset.label_noise"])
    if isinstance(noise, bool) or not isinstance(noise, float | int) or not 0 <= noise < 1:
        raise ConfigError(
            f"dataset.label_noise={noise!r} must be a number in [0, 1) (a fraction of the "
            f"training labels; 0: none)"
        )


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` naming the first bad field (no data, no compute).

    The schema only: names are checked against :mod:`regime_jax.registry`; what only an
    implementation can check (a model's fields, the stability and timescales blocks) is
    :func:`regime_jax.run.loop.check_config`'s.
    """
    _int_in("parallel.devices", c.parallel.devices, 0, DEVICES_MAX, " (0: all local devices)")
    _int_in("steps_per_call", c.steps_per_call, 1, STEPS_PER_CALL_MAX, " (1: a step per call)")
    for field in ("seed", "probe.seed", "stability.seed"):
        _seed(field, get_field(c, field))
    if c.dataset.name != CUSTOM:  # a user's Dataset object has none of these fields
        _seed("dataset.seed", c.dataset.seed)
        _choice("dataset.name", c.dataset.name, registry.DATASETS.names())
        _dataset_fields(c.dataset)
    _bool("overwrite", c.overwrite)
    if c.model.name != CUSTOM:
        _choice("model.name", c.model.name, registry.MODELS.names())
    _choice("optimizer.name", c.optimizer.name, OPTIMIZERS)
    _choice("optimizer.schedule", c.optimizer.schedule, SCHEDULES)
    _positive("optimizer.learning_rate", c.optimizer.learning_rate, float)
    _at_most("optimizer.learning_rate", c.optimizer.learning_rate, FLOAT32_MAX, " (float32)")
    momentum = c.optimizer.get("momentum", 0.0)
    if isinstance(momentum, bool) or not isinstance(momentum, float | int) or not 0 <= momentum < 1:
        raise ConfigError(f"optimizer.momentum={momentum!r} must be a number in [0, 1)")
    decay = c.optimizer.get("weight_decay", ADDED_FIELDS["optimizer.weight_decay"])
    if (
        isinstance(decay, bool)
        or not isinstance(decay, float | int)
        or not 0 <= decay <= FLOAT32_MAX
    ):
        raise ConfigError(
            f"optimizer.weight_decay={decay!r} must be a finite number >= 0 (used by adamw only)"
        )
    if decay != ADDED_FIELDS["optimizer.weight_decay"] and c.optimizer.name != "adamw":
        raise ConfigError(  # another optimizer would ignore it: a setting that changes nothing
            f"optimizer.weight_decay={decay!r} is read by optimizer.name='adamw' alone, not "
            f"{c.optimizer.name!r}; allowed: optimizer.name=adamw, or weight_decay left at "
            f"{ADDED_FIELDS['optimizer.weight_decay']}"
        )
    for field, high, note in (
        ("batch_size", SIZE_MAX, ""),
        ("num_steps", STEPS_MAX, " (the step counter is int32)"),
        ("probe.size", SIZE_MAX, ""),
        ("eval_batch_size", SIZE_MAX, ""),
    ):
        _positive(field, get_field(c, field), high=high)
        _int_in(field, get_field(c, field), 1, high, note)
    warmup = c.optimizer.get("warmup_steps", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < c.num_steps:
        raise ConfigError(
            f"optimizer.warmup_steps={c.optimizer.warmup_steps!r}; allowed values: "
            f"0..{c.num_steps - 1} (below num_steps)"
        )
    for field in (
        "record.every_steps",
        "record.snapshot_every_steps",
        "log_every_steps",
        "eval_every_steps",
    ):
        _cadence(field, get_field(c, field), c.num_steps)
    for field in ("record.every_steps", "eval_every_steps"):
        _events(field, get_field(c, field), c.num_steps)
    ck = c.checkpoint
    _int_in("checkpoint.every_steps", ck.every_steps, 0, STEPS_MAX, " (0: only at the end)")
    _events("checkpoint.every_steps", ck.every_steps, c.num_steps)
    # Keeping more checkpoints than a run can write is harmless; the bound keeps it a count.
    _int_in("checkpoint.keep", ck.keep, 1, STEPS_MAX)
    st = c.stability
    _int_in("stability.num_points", st.num_points, 0, EVENTS_MAX, " (0: no stability test)")
    if isinstance(st.num_examples, bool) or not isinstance(st.num_examples, int):
        st_ok = False
    else:
        st_ok = 0 <= st.num_examples <= c.probe.size
    if not st_ok:
        raise ConfigError(
            f"stability.num_examples={st.num_examples!r}; allowed values: 0..{c.probe.size} "
            f"(probe.size; 0 means the whole probe set)"
        )
    _int_in(
        "record.probe_chunk",
        c.record.get("probe_chunk", 0),
        0,
        SIZE_MAX,
        " (0: auto, chunks of at most 64 MiB of pre-activations)",
    )
    for field in ("record.sample_units", "record.sample_positions"):
        _int_in(field, c.record.get(field.split(".")[1], 0), 0, SIZE_MAX, " (0: all)")
    _seed("record.sample_seed", c.record.get("sample_seed", 0))
    _activations(c)
    _implementation_bounds(c)
    _decouple_fields(c)
    if c.record.snapshot_every_steps % c.record.every_steps:
        raise ConfigError(
            f"record.snapshot_every_steps={c.record.snapshot_every_steps} must be a multiple of "
            f"record.every_steps={c.record.every_steps} (snapshots are taken at record steps)"
        )


def _implementation_bounds(c: ml_collections.ConfigDict) -> None:
    """Upper bounds of the fields whose other checks are the implementations' (the
    stability, timescales and online-detector dataclasses, in ``loop.check_config``)."""
    st, ts, on = c.stability, c.timescales, c.decouple.online
    for field in ("num_directions", "num_radii", "refine", "radius_batch"):
        _at_most(f"stability.{field}", st.get(field), STABILITY_COUNT_MAX)
    for field in ("min_radius", "max_radius"):
        _at_most(f"stability.{field}", st.get(field), FLOAT32_MAX, " (float32)")
    # Windows and counts of points of a recorded series, which has at most EVENTS_MAX + 2
    # points; the smoothing allocates a window-long kernel.
    for block, name, field in (
        (ts, "timescales", "window"),
        (ts, "timescales", "min_points"),
        (on, "decouple.online", "window"),
        (on, "decouple.online", "patience"),
    ):
        _at_most(f"{name}.{field}", block.get(field), EVENTS_MAX + 2, " (points of a series)")


def _decouple_fields(c: ml_collections.ConfigDict) -> None:
    d = c.decouple
    f = d.freeze_step
    if isinstance(f, bool) or not isinstance(f, int) or not -1 <= f <= STEPS_MAX:
        raise ConfigError(
            f"decouple.freeze_step={f!r}; allowed values: -1 (never) or a step in 0..{STEPS_MAX} "
            f"(>= num_steps={c.num_steps} also never freezes)"
        )
    _bool("decouple.auto", d.auto)
    if d.get("cache", "auto") not in ("auto", "off"):
        raise ConfigError(f"decouple.cache={d.cache!r}; allowed values: 'auto', 'off'")
    if d.auto and f != -1:
        raise ConfigError(
            f"decouple.freeze_step={f} with decouple.auto=True; allowed: one of them "
            f"(freeze_step=-1 with auto, or auto=False with a freeze step)"
        )
    if d.auto:
        _cadence("decouple.check_every_steps", d.check_every_steps, c.num_steps)
        _events("decouple.check_every_steps", d.check_every_steps, c.num_steps)
    else:
        _int_in("decouple.check_every_steps", d.check_every_steps, 1, STEPS_MAX)


# ----------------------------------------------------------------- config files and overrides

VARIANTS = ("quick",)


def variant(arg: str | None, allowed: tuple[str, ...] = VARIANTS) -> str | None:
    """An experiment's ``:arg``: None (the full run) or one of ``allowed``, else ConfigError."""
    if arg is None or arg in allowed:
        return arg
    names = ", ".join(f"':{a}'" for a in allowed)
    raise ConfigError(f"unknown config variant ':{arg}'; allowed: none (the full run), {names}")
