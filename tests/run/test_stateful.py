"""Stateful models as their authors train them: BatchNorm statistics and dropout (issue 20, 4).

The monitor measures the model as it is now (the current statistics, in eval mode) and takes
step sizes of the trained params only; NNX dropout with its RNG held in the module works under
capture and jit; the built-in loop trains in train mode (dropout on, statistics updated and
checkpointed) and evaluates in eval mode, or refuses a model whose mode it cannot set; every
cause of a model that cannot run gets its own one-line error.

Layer names are never hard-coded here (capture's names are changing): layers are told apart
by their unit counts (16 and 12).
"""

from __future__ import annotations

import dataclasses
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from flax import nnx

import regime_jax as rj
from regime_jax import data, models, records
from regime_jax.analyzer import StateError
from regime_jax.configs.base import ConfigError
from regime_jax.models.adapt import as_net
from regime_jax.run import loop, step

STEPS = 5


def _blobs(seed: int = 0, n_train: int = 96, n_val: int = 48) -> data.Dataset:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(40, 3))
    x_train, x_val = (rng.normal(size=(n, 40)).astype(np.float32) for n in (n_train, n_val))
    y_train, y_val = ((x @ w).argmax(-1).astype(np.int32) for x in (x_train, x_val))
    return data.Dataset("blobs", x_train, y_train, x_val, y_val, 3)


class LinenBNDrop(nn.Module):
    """BatchNorm then dropout, mode set by ``train``: as a linen user writes it."""

    rate: float = 0.3

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16, name="fc1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn1")(x)
        x = nn.Dropout(self.rate, deterministic=not train)(nn.relu(x))
        x = nn.relu(nn.Dense(12, name="fc2")(x))
        return nn.Dense(3, name="head")(x)


class NNXBNDrop(nnx.Module):
    """The same in NNX, the dropout RNG held in the module (``nnx.Dropout(rate, rngs=rngs)``)."""

    def __init__(self, rngs: nnx.Rngs, rate: float = 0.3):
        self.fc1 = nnx.Linear(40, 16, rngs=rngs)
        self.bn1 = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.fc2 = nnx.Linear(16, 12, rngs=rngs)
        self.head = nnx.Linear(12, 3, rngs=rngs)

    def __call__(self, x):
        h = self.drop(nnx.relu(self.bn1(self.fc1(x))))
        return self.head(nnx.relu(self.fc2(h)))


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _by_units(masks) -> dict[int, np.ndarray]:
    """The monitor's masks keyed by unit count (16: after the BatchNorm, 12: fc2)."""
    out = {p.units: np.asarray(p.unpack()) for p in masks.values()}
    assert sorted(out) == [12, 16]
    return out


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.float64(v))) for v in jax.tree.leaves(tree))))


def _assert_steps_of_params(metrics, p_prev, p_cur):
    """step/* equal a hand computation over the params alone (no batch_stats, no RNG)."""
    diff = jax.tree.map(lambda a, b: np.float64(a) - np.float64(b), p_cur, p_prev)
    parts = {"fc1", "bn1", "fc2", "head"}
    assert {k.removeprefix("step/abs/") for k in metrics if k.startswith("step/abs/")} == {
        *parts,
        "all",
    }
    for part in parts:
        np.testing.assert_allclose(metrics[f"step/abs/{part}"], _norm(diff[part]), rtol=1e-4)
        rel = _norm(diff[part]) / _norm(p_prev[part])
        np.testing.assert_allclose(metrics[f"step/rel/{part}"], rel, rtol=1e-4)
    np.testing.assert_allclose(metrics["step/abs/all"], _norm(diff), rtol=1e-4)
    np.testing.assert_allclose(metrics["step/rel/all"], _norm(diff) / _norm(p_prev), rtol=1e-4)


# ----------------------------------------------------------------------------- (a) linen loop
def _linen_z(model, variables, x) -> dict[int, np.ndarray]:
    """``z > 0`` by hand: flax's own eval-mode forward, its intermediates read back."""
    _, inter = model.apply(variables, x, train=False, capture_intermediates=True)
    inter = inter["intermediates"]
    return {
        16: np.asarray(inter["bn1"]["__call__"][0]) > 0,
        12: np.asarray(inter["fc2"]["__call__"][0]) > 0,
    }


def test_linen_batchnorm_dropout_in_a_user_loop():
    ds = _blobs()
    probe_x = jnp.asarray(ds.x_val[:32])
    model = LinenBNDrop()
    variables = model.init(jax.random.key(0), probe_x[:1])
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(1e-2)
    monitor = rj.pattern_monitor(rj.capture_relus(model.apply), probe_x, train=False)
    opt_state, mstate = tx.init(params), monitor.init(variables, params=params)

    @jax.jit
    def step(params, batch_stats, opt_state, mstate, x, y, key):
        def loss_fn(p):
            logits, new = model.apply(
                {"params": p, "batch_stats": batch_stats},
                x,
                train=True,
                rngs={"dropout": key},
                mutable=["batch_stats"],
            )
            return _xent(logits, y), new["batch_stats"]

        (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        now = {"params": params, "batch_stats": batch_stats}
        metrics, mstate = monitor.update(mstate, now, updates)
        return params, batch_stats, opt_state, mstate, metrics

    for i in range(STEPS):
        x, y = ds.x_train[i * 16 : (i + 1) * 16], ds.y_train[i * 16 : (i + 1) * 16]
        p_prev = params
        params, batch_stats, opt_state, mstate, metrics = step(
            params, batch_stats, opt_state, mstate, x, y, jax.random.fold_in(jax.random.key(9), i)
        )
        _assert_steps_of_params(metrics, p_prev, params)
    masks = _by_units(mstate.masks)
    now = _linen_z(model, {"params": params, "batch_stats": batch_stats}, probe_x)
    stale = _linen_z(model, {"params": params, "batch_stats": variables["batch_stats"]}, probe_x)
    for units in (16, 12):
        np.testing.assert_array_equal(masks[units], now[units])
    assert not np.array_equal(masks[16], stale[16])  # the statistics moved: the test can tell


# ----------------------------------------------------------------------------- (b) NNX loop
def _nnx_z(model: nnx.Module, x) -> dict[int, np.ndarray]:
    """``z > 0`` by hand on an eval-mode copy of ``model``."""
    ev = nnx.clone(model)
    ev.eval()
    z1 = ev.bn1(ev.fc1(x))
    return {16: np.asarray(z1) > 0, 12: np.asarray(ev.fc2(nnx.relu(z1))) > 0}


def _nnx_params(model: nnx.Module):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_nnx_batchnorm_dropout_with_nnx_optimizer_in_a_user_loop():
    ds = _blobs()
    probe_x = jnp.asarray(ds.x_val[:32])
    model = NNXBNDrop(nnx.Rngs(0, dropout=1))
    initial = nnx.clone(model)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    apply_fn, state = rj.nnx_apply(model)
    assert model.drop.deterministic is False  # nnx_apply's eval mode is its own, not the model's
    monitor = rj.pattern_monitor(rj.capture_relus(apply_fn), probe_x)
    mstate = monitor.init(state, params=nnx.state(model, nnx.Param))

    @nnx.jit
    def step(model, optimizer, mstate, x, y):
        grads = nnx.grad(lambda m: _xent(m(x), y))(model)  # train mode: dropout, statistics
        updates = optimizer.update(model, grads)
        return monitor.update(mstate, nnx.state(model), updates)

    for i in range(STEPS):
        x, y = ds.x_train[i * 16 : (i + 1) * 16], ds.y_train[i * 16 : (i + 1) * 16]
        p_prev = _nnx_params(model)
        metrics, mstate = step(model, optimizer, mstate, x, y)
        _assert_steps_of_params(metrics, p_prev, _nnx_params(model))
    assert int(model.drop.rngs.count[...]) == STEPS  # the module's own RNG drew each step
    masks = _by_units(mstate.masks)
    now = _nnx_z(model, probe_x)
    nnx.update(initial, nnx.state(model, nnx.Param))  # today's params, the initial statistics
    stale = _nnx_z(initial, probe_x)
    for units in (16, 12):
        np.testing.assert_array_equal(masks[units], now[units])
    assert not np.array_equal(masks[16], stale[16])


# ----------------------------------------------------------------------------- (c) built-in loop
def _config(num_steps=8):
    every = min(num_steps, 4)
    return tiny_config(
        num_steps=num_steps,
        log_every_steps=every,
        eval_every_steps=every,
        **{"checkpoint.every_steps": every, "checkpoint.keep": 2},
    )


def _rows(workdir) -> list[dict]:
    return records.read_rows(workdir)


def _same_bytes(a, b):
    assert (a / records.METRICS).read_bytes() == (b / records.METRICS).read_bytes()
    snaps = sorted(p.name for p in (a / "masks").glob("*.npz"))
    assert snaps and snaps == sorted(p.name for p in (b / "masks").glob("*.npz"))
    for name in snaps:
        assert (a / "masks" / name).read_bytes() == (b / "masks" / name).read_bytes()


MAKERS = {
    "linen": lambda rate: LinenBNDrop(rate),
    "nnx": lambda rate: NNXBNDrop(nnx.Rngs(0, dropout=1), rate),
}


def _assert_dropout_in_training_only(make, ds, tmp_path, full=None):
    """The same run with dropout rate 0 starts from the same params: its first train loss
    differs (dropout is on in training) and its step-0 eval is the same (off in eval)."""
    if full is None:
        full = tmp_path / "dropout"
        loop.train_and_evaluate(_config(num_steps=1), full, model=make(0.3), dataset=ds)
    plain = tmp_path / "rate0"
    loop.train_and_evaluate(_config(num_steps=1), plain, model=make(0.0), dataset=ds)
    rows, rows0 = _rows(full), _rows(plain)
    assert rows[0]["step"] == rows0[0]["step"] == 0 and rows[1]["step"] == rows0[1]["step"] == 1
    assert rows[0]["eval/loss"] == rows0[0]["eval/loss"]
    assert rows[1]["train/loss"] != rows0[1]["train/loss"]


@pytest.mark.parametrize("family", ["linen", "nnx"])
def test_train_and_evaluate_trains_in_train_mode_and_resumes_exactly(family, tmp_path):
    make, ds, config = MAKERS[family], _blobs(), _config()
    full = tmp_path / "full"
    loop.train_and_evaluate(config, full, model=make(0.3), dataset=ds)
    if family == "linen":  # NNX: test_nnx_dropout_is_on_in_training_only (heavy), and below
        _assert_dropout_in_training_only(make, ds, tmp_path, full)
    # the batch statistics are trained, carried in the state and checkpointed
    restored = loop.restore(config, full, model=make(0.3), dataset=ds)
    first = jax.tree.leaves(restored.initial.model_state.variables)
    last = jax.tree.leaves(restored.latest.model_state.variables)
    assert len(first) == len(last) == 2  # mean and var of bn1
    assert all(not np.array_equal(a, b) for a, b in zip(first, last, strict=True))
    # killed after step 4's checkpoint, resumed: the same bytes
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "8")
    loop.train_and_evaluate(config, resumed, model=make(0.3), dataset=ds)
    _same_bytes(full, resumed)


@pytest.mark.heavy
def test_nnx_dropout_is_on_in_training_only(tmp_path):
    _assert_dropout_in_training_only(MAKERS["nnx"], _blobs(), tmp_path)


def test_nnx_train_mode_drops_units_with_the_step_key_and_eval_does_not():
    """What the loop's step runs for an NNX module (as_net's Modes), on one batch."""
    model = NNXBNDrop(nnx.Rngs(0, dropout=1), rate=0.5)
    net, x = as_net(model), jnp.asarray(_blobs().x_train[:16])
    params, state = net.modes.init(None, x)
    a, new = net.modes.train(params, state, x, jax.random.key(1))
    b, _ = net.modes.train(params, state, x, jax.random.key(1))
    c, _ = net.modes.train(params, state, x, jax.random.key(2))
    np.testing.assert_array_equal(a, b)  # the step's key decides the mask
    assert not np.array_equal(a, c)  # another step, another mask
    no_drop = as_net(NNXBNDrop(nnx.Rngs(0, dropout=1), rate=0.0))
    d, _ = no_drop.modes.train(*no_drop.modes.init(None, x), x, jax.random.key(1))
    assert not np.array_equal(a, d)  # dropout is on in train mode
    assert not np.array_equal(  # the statistics were updated
        np.asarray(new["bn1"]["mean"][...]), np.asarray(state["bn1"]["mean"][...])
    )
    variables = net.modes.join(params, state)
    np.testing.assert_array_equal(net.apply(variables, x), net.apply(variables, x))
    assert model.drop.deterministic is False  # the user's module is never switched


def test_deterministic_flag_is_inverted_for_train_mode():
    class Det(nn.Module):
        @nn.compact
        def __call__(self, x, deterministic: bool = True):
            return nn.Dropout(0.5, deterministic=deterministic)(nn.relu(nn.Dense(8)(x)))

    net, x = as_net(Det()), jnp.ones((4, 3))
    params, state = net.modes.init(jax.random.key(0), x)
    variables = net.modes.join(params, state)
    trained, _ = net.modes.train(params, state, x, jax.random.key(1))
    evaluated = net.apply(variables, x)
    assert net.modes.flag == "deterministic"
    assert float(jnp.mean(trained == 0)) > float(jnp.mean(evaluated == 0))  # dropout in train
    np.testing.assert_array_equal(evaluated, net.apply(variables, x))  # eval: deterministic


# ----------------------------------------------------------------------------- (d) errors
class LinenDrop(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(8)(x)))
        return nn.Dense(3)(x)


def _one_line(excinfo, pattern: str) -> None:
    text = str(excinfo.value)
    assert "\n" not in text, text
    assert "cannot be passed" not in text, text  # not blamed on the probe
    assert re.search(pattern, text), text


def test_each_cause_gets_its_own_one_line_error():
    x = jnp.ones((4, 40))
    model = LinenBNDrop()
    variables = model.init(jax.random.key(0), x)
    monitor = rj.pattern_monitor(rj.capture_relus(model.apply), x, train=False)
    with pytest.raises(StateError) as e:  # the params alone
        monitor.init(variables["params"])
    _one_line(e, r"no 'params' collection.*params-only tree.*\{'params': params")
    with pytest.raises(StateError) as e:  # a collection missing
        monitor.init({"params": variables["params"]})
    _one_line(e, r"reads collection 'batch_stats'.*'batch_stats': \.\.\.")
    with pytest.raises(StateError) as e:  # a statistics update on the probe forward
        rj.pattern_monitor(rj.capture_relus(model.apply), x, train=True).init(variables)
    _one_line(e, r"updates its 'batch_stats' collection.*train=False")
    drop = LinenDrop()
    drop_vars = drop.init(jax.random.key(0), x)
    with pytest.raises(StateError) as e:  # an RNG drawn on the probe forward
        rj.pattern_monitor(rj.capture_relus(drop.apply), x, train=True).init(drop_vars)
    _one_line(e, r"draws 'dropout' RNG.*train=False")
    # NNX: a state mutated outside the traced call (the module closed over, train mode)
    module = NNXBNDrop(nnx.Rngs(0, dropout=1))
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    closed = lambda p, x: nnx.merge(graphdef, p, rest)(x)
    with pytest.raises(StateError) as e:
        rj.pattern_monitor(rj.capture_relus(closed), x).init(params)
    _one_line(e, r"mutates state it holds outside.*rj\.nnx_apply")
    # NNX: the Param state where the full state is needed
    apply_fn, _ = rj.nnx_apply(module)
    with pytest.raises(StateError) as e:
        rj.pattern_monitor(rj.capture_relus(apply_fn), x).init(nnx.state(module, nnx.Param))
    _one_line(e, r"nnx\.Param state alone.*bn1/mean.*nnx\.state\(model\)")
    # a real shape mismatch is still the probe's
    with pytest.raises(ValueError, match=r"probe_x with shape \(4, 41\) cannot be passed"):
        rj.pattern_monitor(rj.capture_relus(model.apply), jnp.ones((4, 41)), train=False).init(
            variables, params=variables["params"]
        )
    # a monitor that was not told which part is trained: the update says how
    mstate = monitor.init(variables)
    with pytest.raises(ValueError, match=r"init\(variables, params="):
        monitor.update(mstate, variables, variables["params"])
    # updates of something the variables do not hold
    with pytest.raises(ValueError, match=r"do not hold"):
        monitor.update(mstate, variables, {"nope": jnp.ones(3)})


class BNNoFlag(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.BatchNorm(use_running_average=False)(nn.Dense(8)(x))
        return nn.Dense(3)(nn.relu(x))


class BNEvalNoFlag(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.BatchNorm(use_running_average=True)(nn.Dense(8)(x))
        return nn.Dense(3)(nn.relu(x))


class DropNoFlag(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dropout(0.5, deterministic=False)(nn.relu(nn.Dense(8)(x)))
        return nn.Dense(3)(x)


@pytest.mark.parametrize(
    ("model", "why"),
    [
        (BNNoFlag(), r"updates the collection 'batch_stats'"),
        (BNEvalNoFlag(), r"reads the collection\(s\) \['batch_stats'\]"),
        (DropNoFlag(), "draws an RNG"),
    ],
    ids=["batch_stats_updated", "batch_stats_read", "dropout"],
)
def test_a_model_whose_mode_cannot_be_set_is_refused_naming_the_flag(model, why, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        loop.train_and_evaluate(_config(), workdir, model=model, dataset=_blobs())
    text = str(e.value)
    assert "\n" not in text and "`train`" in text, text
    assert re.search(why, text), text
    assert not workdir.exists()  # refused before any write


def test_gate_freezing_of_a_model_with_a_train_mode_is_refused(tmp_path):
    config = _config()
    config.decouple.freeze_step = 4
    with pytest.raises(ConfigError, match=r"decouple.*'train'"):
        loop.train_and_evaluate(config, tmp_path / "run", model=LinenBNDrop(), dataset=_blobs())
    assert not (tmp_path / "run").exists()


class NNXDropNoRng(nnx.Module):
    """Dropout without its RNG: train mode cannot run (the loop gives no ``rngs`` argument)."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(40, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.5)
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.drop(nnx.relu(self.fc1(x))))


class LinenNoise(nn.Module):
    """Draws an RNG stream other than ``dropout`` in train mode."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.Dense(16)(x))
        if train:
            h = h + jax.random.normal(self.make_rng("noise"), h.shape)
        return nn.Dense(3)(h)


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: NNXDropNoRng(nnx.Rngs(0)), r"nnx\.Dropout\(rate, rngs=rngs\).*no `rngs`"),
        (lambda: LinenNoise(), r"'train' set, rngs=\{'dropout': key\}.*\"noise\""),
    ],
    ids=["nnx_dropout_without_rngs", "linen_other_stream"],
)
def test_a_model_that_cannot_train_in_train_mode_is_refused_before_any_write(make, why, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        loop.train_and_evaluate(_config(), workdir, model=make(), dataset=_blobs())
    assert "\n" not in str(e.value) and re.search(why, str(e.value)), str(e.value)
    assert not workdir.exists()


def test_a_model_without_a_train_mode_keeps_todays_train_state():
    """Built-in and other mode-less models: the state (and so the checkpoints, old ones
    included) of before; only a model with a train mode gets the StatefulTrainState."""
    today = ["step", "params", "opt_state", "monitor", "frozen"]
    assert [f.name for f in dataclasses.fields(step.TrainState)] == today
    tx, key, x = optax.sgd(0.1), jax.random.key(0), jnp.ones((4, 40))
    builtin = models.create_model({"name": "mlp", "hidden": (8,)}, 3)
    for model, cls in ((builtin, step.TrainState), (LinenBNDrop(), step.StatefulTrainState)):
        state = jax.eval_shape(lambda k, m=model: step.create_train_state(m, tx, k, x), key)
        assert type(state) is cls
