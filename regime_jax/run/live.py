"""The live view of a run: TensorBoard scalars and a progress bar, fed at each host fetch.

* :class:`Scalars` writes every finite scalar of every fetched row to TensorBoard event files
  under ``workdir/tb`` with tensorboardX (no TensorFlow), one event per row:
  ``tensorboard --logdir runs/`` shows ``flip/<layer>`` against ``step/abs/<part>`` while the
  run trains. On resume the new
  event file starts with a purge at the resume step, so TensorBoard drops the earlier file's
  points after it (the rows ``metrics.jsonl`` also rewrote). ``metrics.jsonl`` stays the
  record; the event files are a view of it.
* :class:`Progress` is a tqdm bar (rate, ETA, the newest loss / flip rate / step size / eval
  accuracy) when stdout is a terminal, and one plain line per fetch otherwise (logs, CI,
  notebooks' captured output), as before.
* :class:`PhaseClock` times the training phases (ordinary; gated once decoupled training
  froze the gates) into ``workdir/timing.json``: wall-clock, so not part of the byte-identical
  record.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from regime_jax import records
from regime_jax.records import TB_DIR, TIMING

_SHOWN = (
    ("train/loss", ".4f"),
    ("train/acc", ".3f"),
    ("flip/all", ".2e"),
    ("step/abs/all", ".2e"),
)


class Scalars:
    """TensorBoard event files of a run's scalar metrics (tensorboardX, flushed per write).

    One event per row: a single ``Summary`` holding every scalar of the row as a
    ``simple_value`` (what ``add_scalar`` writes one event each for), so a row of 40 scalars
    is one record to serialize and frame instead of 40. TensorBoard reads each value of an
    event's summary as a point of its tag at the event's step.
    """

    def __init__(self, workdir: str | Path, start_step: int):
        from tensorboardX import SummaryWriter
        from tensorboardX.proto.summary_pb2 import Summary

        self._writer = SummaryWriter(
            logdir=str(Path(workdir) / TB_DIR), purge_step=start_step or None, flush_secs=5
        )
        self._summary, self._value = Summary, Summary.Value

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        events = self._writer._get_file_writer()  # the writer add_scalar writes through
        for row in rows:
            values = [
                self._value(tag=key, simple_value=float(value))
                for key, value in row.items()
                if key != "step" and _is_scalar(value)
            ]
            if values:
                events.add_summary(self._summary(value=values), int(row["step"]))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _is_scalar(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """The newest row's headline metrics plus the newest eval among ``rows``."""
    row = rows[-1]
    parts = [f"{key} {row[key]:{fmt}}" for key, fmt in _SHOWN if key in row]
    evals = [r for r in rows if "eval/acc" in r]
    if evals:
        parts.append(f"eval/acc {evals[-1]['eval/acc']:.3f} (step {evals[-1]['step']})")
    return " | ".join(parts)


class Progress:
    """A progress bar on a terminal; one line per fetch otherwise."""

    def __init__(self, num_steps: int, start_step: int, stream: Any = None):
        self.num_steps, self._stream = num_steps, stream or sys.stdout
        self._tic, self._tic_step = time.perf_counter(), start_step
        self._bar = None
        if getattr(self._stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(
                total=num_steps, initial=start_step, unit="step", file=self._stream,
                dynamic_ncols=True, smoothing=0.1,
            )  # fmt: skip

    def update(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        step = int(rows[-1]["step"])
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(summary(rows), refresh=True)
            return
        rate = (step - self._tic_step) / max(time.perf_counter() - self._tic, 1e-9)
        self._tic, self._tic_step = time.perf_counter(), step
        line = f"step {step:>6d}/{self.num_steps} | {summary(rows)} | {rate:.1f} steps/s"
        print(line, file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class PhaseClock:
    """Seconds and steps of each training phase, ``{"ordinary": ..., "gated": ...}``.

    A phase's clock starts once the phase's first host call has finished (blocking on the
    state), so compilation and the first dispatch are not timed, and stops (blocking again) at
    the freeze and at the end. Eval, stability tests and fetches inside the phase count: the
    figure is the phase's cost per step as a run pays it. A resumed run adds to the file.
    """

    def __init__(self, workdir: Path, start: int, *, write: bool):
        self.path, self.write_file, self._t0 = Path(workdir) / TIMING, write, None
        self._mark: tuple[int, float] | None = None  # (step, time) of the last mark
        self.phases = {
            "ordinary": {"steps": 0, "seconds": 0.0},
            "gated": {"steps": 0, "seconds": 0.0},
        }
        self.notes: dict[str, Any] = {}  # the frozen phase's path (Engine.freeze)
        if start and self.path.exists():
            try:
                self.phases |= json.loads(self.path.read_text())["phases"]
            except (ValueError, KeyError, TypeError):
                pass  # a timing file is a convenience, never a reason to stop a run

    def tick(self, state: Any, step: int, phase: str) -> None:
        """After a host call ending at ``step``; starts ``phase``'s clock if not running."""
        if self._t0 is None:
            jax.block_until_ready(state)
            self._t0, self._from, self._phase = time.perf_counter(), step, phase

    def mark(self, state: Any, step: int) -> None:
        """Notes the time at ``step`` right after its host call (blocking): a phase that ends
        there (the freeze, the last step) ends before that step's eval, fetch and save."""
        if self._t0 is not None:
            jax.block_until_ready(state)
            self._mark = (step, time.perf_counter())

    def stop(self, state: Any, step: int) -> None:
        """Stops the running clock at ``step`` (at its mark, if it has one)."""
        if self._t0 is not None:
            marked, at = self._mark or (None, 0.0)
            if marked != step:
                jax.block_until_ready(state)
                at = time.perf_counter()
            spent = self.phases[self._phase]
            spent["steps"] += step - self._from
            spent["seconds"] += at - self._t0
            self._t0 = None

    def note(self, **fields: Any) -> None:
        """Adds ``fields`` to the file (``frozen_path``: "cached" or "gated", and why)."""
        self.notes.update(fields)

    def write(self) -> None:
        if self.write_file:
            rate = {
                k: v["seconds"] / v["steps"] if v["steps"] else None for k, v in self.phases.items()
            }
            out = {"phases": self.phases, "seconds_per_step": rate, **self.notes}
            records.write_atomic(self.path, records.to_json(out, indent=1) + "\n")
