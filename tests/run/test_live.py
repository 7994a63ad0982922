"""The live view: TensorBoard event files hold the run's scalars; a bar on a terminal."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from tensorboardX.proto.event_pb2 import Event

from regime_jax import records
from regime_jax.run import live, loop


def read_events(directory: Path) -> list[Event]:
    """Every event of every file in ``directory``, in file order (TFRecord framing)."""
    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            events.append(Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
    return events


def scalars(events: list[Event]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for event in events:
        for value in event.summary.value:
            out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("live")
    loop.train_and_evaluate(tiny_config(), workdir)
    return workdir


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / records.METRICS).read_text().splitlines()]


def test_one_event_per_row_holds_all_of_its_scalars(tiny_run):
    rows, events = _rows(tiny_run), read_events(tiny_run / records.TB_DIR)
    summaries = [e for e in events if e.HasField("summary")]
    assert [e.step for e in summaries] == [r["step"] for r in rows]
    for event, row in zip(summaries, rows, strict=True):
        scalar = {k: v for k, v in row.items() if k != "step" and live._is_scalar(v)}
        assert [v.tag for v in event.summary.value] == list(scalar)  # the row's order
        np.testing.assert_allclose(
            [v.simple_value for v in event.summary.value], list(scalar.values()), rtol=1e-6
        )


def test_tensorboard_reads_the_same_tags_and_values(tiny_run):
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard is not installed (tensorboardX writes without it)",
    )
    acc = accumulator.EventAccumulator(str(tiny_run / records.TB_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    rows = _rows(tiny_run)
    expected: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and live._is_scalar(value):
                expected.setdefault(key, {})[row["step"]] = value
    assert sorted(acc.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        read = {e.step: e.value for e in acc.Scalars(tag)}
        assert sorted(read) == sorted(points), tag
        np.testing.assert_allclose([read[s] for s in points], list(points.values()), rtol=1e-6)


def test_event_files_hold_every_scalar_of_metrics_jsonl(tiny_run):
    tb = scalars(read_events(tiny_run / records.TB_DIR))
    rows = _rows(tiny_run)
    flips = {r["step"]: r["flip/all"] for r in rows if "flip/all" in r}
    assert sorted(tb["flip/all"]) == sorted(flips) == list(range(1, 13))
    np.testing.assert_allclose([tb["flip/all"][s] for s in flips], list(flips.values()), rtol=1e-6)
    assert {"flip/fc1", "step/abs/all", "step/rel/fc2", "eval/acc", "dead/fc1"} <= set(tb)
    assert sorted(tb["eval/acc"]) == [0, 6, 12]


def test_resume_purges_the_rewritten_steps(tmp_path):
    config = tiny_config(num_steps=12, **{"checkpoint.every_steps": 6})
    loop.train_and_evaluate(config, tmp_path)
    # Back to the checkpoint at step 6 as a run killed there would be, then resume.
    for step in (12,):
        (tmp_path / "checkpoints" / str(step)).rename(tmp_path / f"gone_{step}")
    loop.train_and_evaluate(config, tmp_path)
    events = read_events(tmp_path / records.TB_DIR)
    starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]
    assert starts == [6]  # TensorBoard drops the first file's points after step 6


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise():
    rows = [{"step": 5, "train/loss": 1.25, "flip/all": 0.01, "step/abs/all": 0.5}]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    bar = live.Progress(20, 0, stream=term)
    bar.update(rows)
    bar.close()
    shown = term.getvalue()
    assert "5/20" in shown and "step/s" in shown and "<" in shown  # count, rate, ETA
    assert "train/loss 1.2500" in shown and "\r" in shown  # redrawn in place

    plain = io.StringIO()
    lines = live.Progress(20, 0, stream=plain)
    lines.update(rows)
    assert plain.getvalue().startswith("step      5/20 | train/loss 1.2500 | flip/all 1.00e-02")
    assert plain.getvalue().rstrip().endswith("steps/s") and "\r" not in plain.getvalue()
