"""The run's one Schedule: every cadence, the chunk plan, and the rows a run must have."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from regime_jax import records
from regime_jax.run import checkpoint, loop
from regime_jax.schedule import Schedule, itstime


@st.composite
def schedules(draw) -> Schedule:
    n = draw(st.integers(1, 300))
    record = draw(st.integers(1, 20))
    freeze = draw(st.sampled_from(["never", "fixed", "auto"]))
    return Schedule(
        num_steps=n,
        record_every=record,
        snapshot_every=record * draw(st.integers(0, 5)),
        eval_every=draw(st.integers(0, 50)),
        log_every=draw(st.integers(0, 50)),
        checkpoint_every=draw(st.integers(0, 60)),
        stability_points=draw(st.integers(0, 6)),
        freeze_step=draw(st.integers(0, n - 1)) if freeze == "fixed" else None,
        freeze_every=draw(st.integers(1, 30)) if freeze == "auto" else 0,
        steps_per_call=draw(st.integers(1, 40)),
    )


# pure Python, but timed on a shared machine: no per-example deadline
PROPERTY = settings(max_examples=100, deadline=None)


def _needs_state(s: Schedule, t: int) -> bool:
    """The host needs the exact state after step t."""
    return s.evals(t) or s.tests_stability(t) or s.checkpoints(t) or s.may_freeze(t)


@PROPERTY
@given(s=schedules(), data=st.data())
def test_chunks_partition_the_steps_and_end_exactly_where_the_host_needs_the_state(s, data):
    start = data.draw(st.integers(0, s.num_steps - 1))
    chunks = list(s.chunks(start))
    steps = [t for c in chunks for t in c.steps]
    assert steps == list(range(start + 1, s.num_steps + 1))  # each step in exactly one chunk
    needed = [t for t in range(start + 1, s.num_steps + 1) if _needs_state(s, t)]
    assert s.chunk_ends(start) == needed
    assert set(needed) <= {c.last for c in chunks}
    assert {c.length for c in chunks} == s.chunk_lengths(start)
    assert all(c.length <= s.steps_per_call for c in chunks)
    for i, c in enumerate(chunks):  # a run resumed at any chunk end runs the same chunks
        assert list(s.chunks(c.last)) == chunks[i + 1 :]


@PROPERTY
@given(s=schedules())
def test_the_flags_of_a_chunk_are_its_steps_cadences_and_fit_its_snapshot_slots(s):
    longest = max(s.chunk_lengths(0), default=1)
    for chunk in s.chunks(0):
        record, snapshot = s.flags(chunk)
        assert record == [s.records(t) for t in chunk.steps]
        on_cadence = [itstime(t, s.snapshot_every, s.num_steps) for t in chunk.steps]
        assert snapshot == [r and c for r, c in zip(record, on_cadence, strict=True)]
        assert sum(snapshot) <= s.most_snapshots(longest)


@PROPERTY
@given(s=schedules(), data=st.data())
def test_expected_rows_and_snapshots_are_the_steps_that_write_them(s, data):
    """Listed from the cadences (cost ~ rows), they equal a walk over every step."""
    upto = data.draw(st.one_of(st.none(), st.integers(0, s.num_steps + 3)))
    top = s.num_steps if upto is None else min(upto, s.num_steps)
    walk = range(top + 1)
    rows = [t for t in walk if t == 0 or s.records(t) or s.evals(t) or s.tests_stability(t)]
    assert s.expected_rows(upto) == rows
    assert s.expected_snapshots(upto) == [t for t in walk if t == 0 or s.snapshots(t)]
    assert s.is_complete(s.expected_rows()) and s.is_complete(range(s.num_steps + 1))
    if len(s.expected_rows()) > 1:
        assert not s.is_complete(s.expected_rows()[:-1])


def test_from_config_reads_a_config_and_its_stored_json_alike():
    config = tiny_config(
        num_steps=30,
        steps_per_call=4,
        log_every_steps=7,
        eval_every_steps=10,
        **{
            "record.every_steps": 2,
            "record.snapshot_every_steps": 6,
            "checkpoint.every_steps": 12,
            "stability.num_points": 3,
            "decouple.auto": True,
            "decouple.check_every_steps": 9,
        },
    )
    s = Schedule.from_config(config)
    assert s == Schedule(30, 2, 6, 10, 7, 12, 3, None, 9, 4)
    assert Schedule.from_config(config.to_dict()) == s  # config.json
    assert s.freezes and [t for t in range(31) if s.checks_freeze(t)] == [0, 9, 18, 27]
    fixed = tiny_config(**{"decouple.freeze_step": 5})
    assert Schedule.from_config(fixed).freeze_step == 5 and Schedule.from_config(fixed).freezes
    never = tiny_config(**{"decouple.freeze_step": 12})  # >= num_steps: never freezes
    assert not Schedule.from_config(never).freezes


def test_an_old_config_json_takes_quiet_defaults_and_one_without_cadences_is_refused():
    old = {"num_steps": 10, "record": {"every_steps": 2, "snapshot_every_steps": 4}}
    s = Schedule.from_config({**old, "eval_every_steps": 5})  # no log, checkpoint, decouple
    assert (s.log_every, s.checkpoint_every, s.freezes, s.steps_per_call) == (0, 0, False, 1)
    assert s.expected_rows() == [0, 2, 4, 5, 6, 8, 10]
    with pytest.raises(KeyError):
        Schedule.from_config(old)
    rows = [{"step": t} for t in (0, 10)]  # records.complete: the last row, for such a file
    assert records.complete(old, rows)
    assert not records.complete({**old, "eval_every_steps": 5}, rows)


def test_a_real_run_writes_the_rows_snapshots_and_checkpoints_its_schedule_lists(tmp_path):
    config = tiny_config(
        steps_per_call=4,
        **{
            "record.every_steps": 2,
            "record.snapshot_every_steps": 4,
            "stability.num_points": 3,
            "stability.num_directions": 2,
            "stability.num_radii": 2,
            "checkpoint.every_steps": 5,
            "checkpoint.keep": 20,
            "decouple.freeze_step": 7,
        },
    )
    s = Schedule.from_config(config)
    loop.train_and_evaluate(config, tmp_path)
    run = records.load_run(tmp_path)
    assert [r["step"] for r in run.rows] == s.expected_rows() == [0, 1, 2, 3, 4, 6, 8, 10, 12]
    assert run.mask_steps == s.expected_snapshots() == [0, 4, 8, 12]
    assert run.partial is None and s.is_complete(r["step"] for r in run.rows)
    kept = checkpoint.Checkpointer(tmp_path, 20)
    assert kept.steps() == [t for t in range(1, 13) if s.checkpoints(t)] == [5, 10, 12]
    kept.close()
    frozen = [r["step"] for r in run.rows if "decouple/freeze_step" in r]
    assert frozen == [t for t in s.expected_rows() if t > s.freeze_step]
    stability = [r["step"] for r in run.rows if "stability/radius_q50" in r]
    assert stability == sorted(s.stability_steps)
    evals = [r["step"] for r in run.rows if "eval/loss" in r]
    assert evals == [t for t in s.expected_rows() if s.evals(t)]


def test_a_schedule_is_a_value():
    s = Schedule(num_steps=12, eval_every=4)
    assert dataclasses.replace(s, eval_every=6).chunk_ends(0) == [6, 12]
    assert s.chunk_ends(0) == [4, 8, 12] and hash(s) == hash(Schedule(12, eval_every=4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.num_steps = 3
