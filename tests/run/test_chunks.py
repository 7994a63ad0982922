"""Several steps per host call: the chunk plan, its bounds, its traces, its records."""

from __future__ import annotations

import collections
import math

import pytest
from conftest import tiny_config
from hypothesis import given
from hypothesis import strategies as st

from regime_jax import records
from regime_jax.configs.base import ConfigError, validate_config
from regime_jax.run import chunks, loop, step
from regime_jax.schedule import Schedule, lengths, plan


@given(
    ends=st.lists(st.integers(1, 300), min_size=1, max_size=8, unique=True).map(sorted),
    k=st.integers(1, 40),
)
def test_the_plan_covers_every_step_ends_at_every_boundary_and_is_prefix_stable(ends, k):
    chunks_ = list(plan(0, ends, k))
    assert [s for c in chunks_ for s in c.steps] == list(range(1, ends[-1] + 1))
    assert set(ends) <= {c.last for c in chunks_}
    used = {c.length for c in chunks_}
    assert used == lengths(0, ends, k)
    assert used <= {k} | {2**j for j in range(max(k - 1, 1).bit_length())}
    assert len(used) <= 1 + math.ceil(math.log2(k)) if k > 1 else used == {1}
    for i, c in enumerate(chunks_):  # a run resumed at any chunk end runs the same chunks
        assert list(plan(c.last, [e for e in ends if e > c.last], k)) == chunks_[i + 1 :]


def test_chunk_ends_are_eval_stability_checkpoint_and_last_steps():
    config = tiny_config(num_steps=30, eval_every_steps=10, **{"checkpoint.every_steps": 12})
    config.stability.num_points = 3  # steps 0, 1, 5, 30
    schedule = Schedule.from_config(config)
    assert schedule.stability_steps == {0, 1, 5, 30}
    assert schedule.chunk_ends(0) == [1, 5, 10, 12, 20, 24, 30]
    assert schedule.chunk_ends(12) == [20, 24, 30]


@pytest.mark.parametrize("value", [0, -1, True])
def test_steps_per_call_must_be_a_positive_int(value):
    with pytest.raises(ConfigError, match=r"steps_per_call=.*allowed values: an int >= 1"):
        validate_config(tiny_config(steps_per_call=value))


def test_chunks_give_the_bytes_of_single_steps_and_trace_each_length_once(tmp_path, monkeypatch):
    """Stability test steps (log-spaced) and eval steps cut the chunks: 12 steps, eval at 6
    and 12, probe at 1, 3, 12 -> chunks 1 | 2 | 2 1 | 4 2 (K=4): lengths 4 and 2 compile
    before the first step, once each; length 1 is the plain step."""
    overrides = {"stability.num_points": 3, "record.snapshot_every_steps": 2}
    loop.train_and_evaluate(tiny_config(**overrides), tmp_path / "k1")
    traced, real = collections.Counter(), step.train_chunk

    def counting(state, batch_TxB, *args, **kwargs):
        traced[batch_TxB["x"].shape[0]] += 1
        return real(state, batch_TxB, *args, **kwargs)

    monkeypatch.setattr(step, "train_chunk", counting)
    dispatched = []
    real_call = chunks.Runner.__call__

    def call(self, state, chunk, batches, **kwargs):
        dispatched.append((chunk.length, dict(traced)))  # traces so far, at each dispatch
        return real_call(self, state, chunk, batches, **kwargs)

    monkeypatch.setattr(chunks.Runner, "__call__", call)
    loop.train_and_evaluate(tiny_config(steps_per_call=4, **overrides), tmp_path / "k4")
    assert [n for n, _ in dispatched] == [1, 2, 2, 1, 4, 2]
    assert all(seen == {4: 1, 2: 1} for _, seen in dispatched)  # all before the first step
    text = lambda d: (tmp_path / d / records.METRICS).read_text()
    assert text("k4") == text("k1")
    snaps = lambda d: sorted(p.name for p in (tmp_path / d / records.MASKS_DIR).iterdir())
    assert snaps("k4") == snaps("k1") and len(snaps("k1")) == 7
    for name in snaps("k1"):
        a = records.read_masks(tmp_path / "k1" / records.MASKS_DIR / name)
        b = records.read_masks(tmp_path / "k4" / records.MASKS_DIR / name)
        assert all((a[k].bits == b[k].bits).all() for k in a)


def test_a_metric_stack_gives_every_metric_back_bit_for_bit():
    """Packed in jit (one array per dtype and shape), fetched, unpacked: each leaf's dtype,
    shape and bits, NaN and limb pairs included; scalars stay 0-d, a chunk's ``[T]`` stays
    ``[T]``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    metrics = {
        "train/loss": jnp.float32(np.nan),
        "flip/all": jnp.float32(1 / 3),
        "flip_count/all": (jnp.uint32(2**32 - 1), jnp.uint32(7)),
        "dead_count/all": jnp.int32(-5),
        "decouple/freeze_step": jnp.int32(12),
        "train/acc": jnp.float32(0.25),
    }
    for lead in ((), (3,)):
        tree = jax.tree.map(lambda a, lead=lead: jnp.broadcast_to(a, lead + a.shape), metrics)
        stack = jax.device_get(jax.jit(step.MetricStack.pack)(tree))
        assert len(stack.arrays) == 3  # float32, uint32, int32
        assert stack.keys() == set(metrics)
        back, want = stack.unpack(), jax.device_get(tree)
        assert jax.tree.structure(back) == jax.tree.structure(want)
        for got, ref in zip(jax.tree.leaves(back), jax.tree.leaves(want), strict=True):
            assert got.dtype == ref.dtype and got.shape == ref.shape == lead
            assert got.tobytes() == np.asarray(ref).tobytes()


def test_the_loops_steps_return_a_few_metric_buffers_and_the_same_records(tmp_path, monkeypatch):
    """The loop's compiled steps (K=1 and a chunk) return their ~20 metrics as one buffer
    per dtype; the records are those of one buffer per metric, byte for byte."""
    import jax

    seen = collections.defaultdict(list)
    real_call = chunks.Runner.__call__

    def call(self, state, chunk, batches, **kwargs):
        state, entry = real_call(self, state, chunk, batches, **kwargs)
        seen[form].append(len(jax.tree.leaves(entry.metrics)))
        return state, entry

    monkeypatch.setattr(chunks.Runner, "__call__", call)
    for form in ("stacked", "plain"):
        if form == "plain":  # one buffer per metric, as before the stack
            monkeypatch.setattr(step, "_stacked", lambda fn: fn)
        for k in (1, 4):
            loop.train_and_evaluate(tiny_config(steps_per_call=k), tmp_path / f"{form}{k}")
    text = lambda d: (tmp_path / d / records.METRICS).read_text()
    for k in (1, 4):
        assert text(f"stacked{k}") == text(f"plain{k}")
    assert max(seen["stacked"]) <= 3 < 10 < min(seen["plain"])
