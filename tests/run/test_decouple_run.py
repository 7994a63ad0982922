"""Decoupled training in a run: ``decouple.freeze_step`` / ``decouple.auto`` (issue 15).

Before the freeze a decoupled run is the ordinary run, byte for byte; from the freeze step F
on the gates are a fixed copy of the parameters at F, training and evaluation go through the
gated network, and the records say how far the values' own patterns left the gates'.
"""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from regime_jax import analyzer, data, records
from regime_jax import gating as decouple
from regime_jax.analysis import online
from regime_jax.configs.base import ConfigError
from regime_jax.run import chunks, loop, step

F = 5  # the freeze step of the tiny runs (12 steps, every step recorded and snapshotted)
CKPT = {"checkpoint.every_steps": 2, "checkpoint.keep": 20}


def _lines(workdir) -> list[str]:
    return (Path(workdir) / records.METRICS).read_text().splitlines()


def _rows(workdir) -> list[dict]:
    return records.read_rows(workdir)


def _masks(workdir, step_: int):
    return records.read_masks(Path(workdir) / records.MASKS_DIR / f"step_{step_:07d}.npz")


def _same_run(a, b) -> None:
    assert _lines(a) == _lines(b)  # byte-identical JSON: every value equal exactly
    names = sorted(p.name for p in (Path(a) / records.MASKS_DIR).glob("*.npz"))
    assert names == sorted(p.name for p in (Path(b) / records.MASKS_DIR).glob("*.npz"))
    for name in names:
        ma, mb = (records.read_masks(Path(d) / records.MASKS_DIR / name) for d in (a, b))
        for k in ma:
            np.testing.assert_array_equal(ma[k].bits, mb[k].bits)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The ordinary tiny run, and the same run frozen at F (checkpoints every 2 steps)."""
    out = {}
    for name, freeze in (("plain", -1), ("frozen", F)):
        workdir = tmp_path_factory.mktemp(name)
        loop.train_and_evaluate(tiny_config(**CKPT, **{"decouple.freeze_step": freeze}), workdir)
        out[name] = workdir
    return out


def test_freeze_step_num_steps_is_byte_identical_to_no_freezing(runs, tmp_path):
    """The decoupled machinery (gates in the state, both step variants) changes nothing."""
    config = tiny_config(**CKPT, **{"decouple.freeze_step": 12})
    loop.train_and_evaluate(config, tmp_path)
    _same_run(runs["plain"], tmp_path)


def test_before_the_freeze_the_run_is_the_ordinary_run(runs):
    plain, frozen = _lines(runs["plain"]), _lines(runs["frozen"])
    upto = lambda lines: [ln for ln in lines if json.loads(ln)["step"] <= F]
    assert upto(frozen) == upto(plain)
    after = [r for r in _rows(runs["frozen"]) if r["step"] > F]
    assert after and all(r["decouple/freeze_step"] == F for r in after)
    assert all("decouple/disagree/all" in r for r in after)  # every step records here
    assert not any(k.startswith("decouple/") for r in _rows(runs["plain"]) for k in r)
    # the training differs after F (the gates no longer follow the values)
    assert [r["train/loss"] for r in after] != [
        r["train/loss"] for r in _rows(runs["plain"]) if r["step"] > F
    ]


def _restored(workdir, config):
    r = loop.restore(config, workdir)
    assert r.step == config.num_steps
    return r


def test_gates_stay_fixed_after_the_freeze(runs):
    config = tiny_config(**CKPT, **{"decouple.freeze_step": F})
    r = _restored(runs["frozen"], config)
    frozen = r.latest.frozen
    assert int(frozen.step) == F
    gates_now = step.probe_patterns(r.model, frozen.gates, r.probe_x)
    at_f = _masks(runs["frozen"], F)  # the ordinary patterns recorded at F
    for layer in at_f:
        np.testing.assert_array_equal(np.asarray(gates_now[layer].bits), at_f[layer].bits)
        np.testing.assert_array_equal(np.asarray(frozen.masks[layer].bits), at_f[layer].bits)
    for a, b in zip(jax.tree.leaves(frozen.gates), jax.tree.leaves(r.latest.params), strict=True):
        assert not np.array_equal(a, b)  # the values moved on


def test_gates_are_the_parameters_at_the_freeze_step(runs, tmp_path):
    """Checkpoint at F of the ordinary run == the frozen run's gates at the end."""
    shutil.copytree(runs["plain"], tmp_path / "p")
    for d in (tmp_path / "p" / "checkpoints").iterdir():
        if d.name.isdigit() and int(d.name) > F - 1:
            shutil.rmtree(d)
    # F is odd and checkpoints are every 2 steps: resume the plain run at F - 1 and stop at F
    config = tiny_config(**CKPT, num_steps=12)
    plain = loop.restore(config, tmp_path / "p")
    assert plain.step == F - 1
    frozen = _restored(runs["frozen"], tiny_config(**CKPT, **{"decouple.freeze_step": F}))
    ds = data.load_dataset(config.dataset)
    batch = next(data.batches(ds, config.batch_size, config.seed, start_step=F - 1))
    probe = {"x": plain.probe_x}
    tx = step.make_optimizer(config.optimizer, config.num_steps)
    state, _, _ = step.make_step_fns(plain.model, tx)[True](plain.latest, batch, probe)
    for a, b in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(frozen.latest.frozen.gates), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eval_and_disagreement_are_those_of_the_gated_network(runs):
    config = tiny_config(**CKPT, **{"decouple.freeze_step": F})
    r = _restored(runs["frozen"], config)
    last = _rows(runs["frozen"])[-1]
    gated = decouple.gated_net(r.model)
    ds = data.load_dataset(config.dataset)
    logits = gated.apply(r.latest.params, r.latest.frozen.gates, ds.x_val)
    acc = float(jnp.mean(jnp.argmax(logits, -1) == ds.y_val))
    assert last["eval/acc"] == pytest.approx(acc, abs=1e-6)
    ordinary = jnp.mean(jnp.argmax(r.model.apply(r.latest.params, ds.x_val), -1) == ds.y_val)
    assert float(ordinary) != pytest.approx(acc, abs=1e-6)  # the test can tell them apart
    _, z_values, z_gates = gated.preacts_fn(r.latest.params, r.latest.frozen.gates, r.probe_x)
    by_hand = decouple.disagreement_metrics(z_values, z_gates)
    assert by_hand["decouple/disagree/all"] > 0
    for key, value in by_hand.items():
        assert last[key] == pytest.approx(float(value), abs=1e-7)
    # flip/* after the freeze are the value stream's own patterns (snapshots are those)
    snap = _masks(runs["frozen"], config.num_steps)
    for layer, packed in analyzer.patterns_from_preacts(z_values).items():
        np.testing.assert_array_equal(np.asarray(packed.bits), snap[layer].bits)


@pytest.mark.parametrize("freeze", [0, F])
def test_steps_per_call_gives_the_bytes_of_single_steps(freeze, tmp_path):
    """A chunk ends at F (F = 5 with K = 4 would otherwise straddle it)."""
    for k in (1, 4):
        config = tiny_config(**{"decouple.freeze_step": freeze, "steps_per_call": k})
        loop.train_and_evaluate(config, tmp_path / f"k{k}")
    _same_run(tmp_path / "k1", tmp_path / "k4")
    first = _rows(tmp_path / "k4")[1]  # step 1's row
    assert first.get("decouple/freeze_step") == (0 if freeze == 0 else None)


def test_both_variants_of_every_chunk_length_compile_before_the_first_step(tmp_path, monkeypatch):
    traced, real = collections.Counter(), step.train_chunk

    def counting(state, batch_TxB, *args, gated_net=None, **kwargs):
        # the cached frozen phase's batches are indices alone
        traced[gated_net is not None, jax.tree.leaves(batch_TxB)[0].shape[0]] += 1
        return real(state, batch_TxB, *args, gated_net=gated_net, **kwargs)

    monkeypatch.setattr(step, "train_chunk", counting)
    seen, real_call = [], chunks.Runner.__call__

    def call(self, state, chunk, batches, *, frozen=False):
        seen.append((frozen, chunk.length, dict(traced)))
        return real_call(self, state, chunk, batches, frozen=frozen)

    monkeypatch.setattr(chunks.Runner, "__call__", call)
    config = tiny_config(**{"decouple.freeze_step": F, "steps_per_call": 4})
    loop.train_and_evaluate(config, tmp_path)
    # eval at 6 and 12, freeze at 5: 4 1 | 1 | 4 2 ; gated from step 6 on
    assert [(g, n) for g, n, _ in seen] == [(False, 4), (False, 1), (True, 1), (True, 4), (True, 2)]
    every = {(g, t): 1 for g in (False, True) for t in (4, 2)}
    assert all(traces == every for _, _, traces in seen)


# A detector loose enough to trigger within 12 tiny steps (at step 6 on this series, from the
# trailing mean of steps 4-6); checks every 3 steps. Its window of 3 makes history matter: a
# run resumed at step 4 that forgot the rows before it could not trigger before step 7.
AUTO = {
    "decouple.auto": True,
    "decouple.check_every_steps": 3,
    "decouple.online": {"window": 3, "fraction": 0.95, "patience": 1},
}


def test_auto_freezes_at_the_first_check_step_after_the_causal_trigger(tmp_path):
    loop.train_and_evaluate(tiny_config(**AUTO), tmp_path)
    rows = _rows(tmp_path)
    frozen_at = {r["decouple/freeze_step"] for r in rows if "decouple/freeze_step" in r}
    assert len(frozen_at) == 1
    (f,) = frozen_at
    before = [r for r in rows if 0 < r["step"] <= f]
    cfg = online.OnlineConfig(**AUTO["decouple.online"])
    trigger = online.online_settle_time(
        [r["step"] for r in before], [r["flip/all"] for r in before], cfg
    ).time
    assert trigger is not None and trigger <= f < trigger + 3 and f % 3 == 0
    r = loop.restore(tiny_config(**AUTO), tmp_path)
    assert int(r.latest.frozen.step) == f


def test_auto_never_triggering_is_an_ordinary_run(runs, tmp_path):
    strict = AUTO | {"decouple.online": {"window": 2, "fraction": 1e-6, "patience": 2}}
    loop.train_and_evaluate(tiny_config(**CKPT, **strict), tmp_path)
    _same_run(runs["plain"], tmp_path)


@pytest.mark.parametrize("resume_at", [4, 8])
def test_a_resumed_auto_run_freezes_at_the_same_step(resume_at, tmp_path):
    """Killed before (4) or after (8) the freeze: the resumed run has the same bytes."""
    config = tiny_config(**CKPT, **AUTO)
    loop.train_and_evaluate(config, tmp_path / "ref")
    assert records.read_rows(tmp_path / "ref")[-1]["decouple/freeze_step"] == 6
    shutil.copytree(tmp_path / "ref", tmp_path / "cut")
    for d in (tmp_path / "cut" / "checkpoints").iterdir():
        if d.name.isdigit() and int(d.name) > resume_at:
            shutil.rmtree(d)
    (tmp_path / "cut" / records.SUMMARY).unlink()
    loop.train_and_evaluate(config, tmp_path / "cut")
    _same_run(tmp_path / "ref", tmp_path / "cut")


class UserNet(nn.Module):
    """A user's linen model: its ReLUs are found by capture (named after the Dense feeding
    them) and gated the same way."""

    @nn.compact
    def __call__(self, x):
        x = jnp.maximum(nn.Dense(16)(x), 0.0)
        return nn.Dense(10)(nn.relu(nn.Dense(12)(x)))


def test_a_captured_user_model_freezes_too(tmp_path):
    loop.train_and_evaluate(tiny_config(**{"decouple.freeze_step": F}), tmp_path, model=UserNet())
    last = _rows(tmp_path)[-1]
    assert last["decouple/freeze_step"] == F
    assert {k for k in last if k.startswith("decouple/disagree/")} == {
        "decouple/disagree/Dense_0",
        "decouple/disagree/Dense_2",
        "decouple/disagree/all",
    }


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"decouple.freeze_step": -2}, "decouple.freeze_step"),
        ({"decouple.freeze_step": True}, "decouple.freeze_step"),
        ({"decouple.auto": True, "decouple.freeze_step": 3}, "decouple.freeze_step"),
        ({"decouple.auto": 1}, "decouple.auto"),
        ({"decouple.auto": True, "decouple.check_every_steps": 13}, "decouple.check_every_steps"),
        ({"decouple.check_every_steps": 0}, "decouple.check_every_steps"),
        ({"decouple.online": {"fraction": 1.5}}, "decouple.online"),
        ({"decouple.online": {"window": 0}}, "decouple.online"),
        ({"decouple.cache": "on"}, "decouple.cache"),
    ],
)
def test_bad_decouple_fields_are_refused_before_any_write(overrides, field, tmp_path):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        loop.train_and_evaluate(tiny_config(**overrides), tmp_path / "w")
    assert not (tmp_path / "w").exists()
