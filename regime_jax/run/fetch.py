"""The host side of a run's metrics: device values held until the log cadence, then rows.

The loop hands the :class:`Fetcher` one :class:`Entry` per host call (one step, or a chunk
of ``steps_per_call`` steps): device arrays only, nothing fetched. :meth:`Fetcher.flush`
fetches the held entries with one ``jax.device_get`` (on the log cadence all but the newest:
one call late, so the host never waits for the call it just dispatched), turns the pattern
counts (``flip_count/..``; int32 or ``(hi, lo)`` uint32 limbs on device) into exact Python
ints (:func:`regime_jax.analyzer.counts_to_int`), then writes rows to
``metrics.jsonl`` and TensorBoard, mask snapshots to ``masks/``, and a progress line. With
several processes every process fetches (and checks for non-finite values, so all stop at
the same step) but only process 0 writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from regime_jax import analyzer, records
from regime_jax.bitmask import Patterns
from regime_jax.run import live
from regime_jax.run.step import MetricStack

# (step, index into the stacked metrics or None for unstacked ones, whether it recorded)
Row = tuple[int, int | None, bool]


class Entry(NamedTuple):
    """What one host call leaves for the records (device arrays, fetched at a flush).

    Attributes:
      rows: the steps that get a row (record steps, and an eval / stability step).
      metrics: the call's metrics: scalars, or stacked ``[T]`` for a chunk; as a
        :class:`~regime_jax.run.step.MetricStack` from the loop's compiled steps.
      extra: eval / stability metrics of the call's last step (its row is the last row).
      snaps: ``(step, slot)`` of each mask snapshot; slot None: ``masks`` is unstacked.
      masks: the call's masks: a step's patterns, or a chunk's ``[S, ...]`` snapshot slots.
      keep: the metric keys of a row that did not record (None: all); a chunk's non-record
        steps carry zeros for the pattern metrics, which rows must not show.
      tail: the row of the call's last step, should eval / stability metrics give it one.
    """

    rows: tuple[Row, ...]
    metrics: Mapping[str, Any]
    extra: Mapping[str, Any] = {}
    snaps: tuple[tuple[int, int | None], ...] = ()
    masks: Patterns | None = None
    keep: frozenset[str] | None = None
    tail: Row | None = None

    @classmethod
    def step(cls, step: int, metrics, masks, *, record: bool, snapshot: bool) -> Entry:
        """One plain step's entry (``masks`` unstacked)."""
        rows = ((step, None, True),) if record else ()
        snaps = ((step, None),) if snapshot and masks is not None else ()
        return cls(rows, metrics, {}, snaps, masks if snaps else None, None, (step, None, record))

    def with_extra(self, extra: Mapping[str, Any]) -> Entry:
        """The entry with its last step's eval / stability metrics; that step gets a row."""
        if not extra:
            return self
        rows = self.rows if self.rows and self.rows[-1] == self.tail else (*self.rows, self.tail)
        return self._replace(rows=rows, extra=extra)

    def expand(self) -> list[dict[str, Any]]:
        """The entry's rows (after ``device_get``), in step order."""
        out = []
        metrics = self.metrics
        if isinstance(metrics, MetricStack):  # the loop's steps: a few stacked buffers
            metrics = metrics.unpack()
        for i, (step, index, recorded) in enumerate(self.rows):
            m = metrics if index is None else {k: v[index] for k, v in metrics.items()}
            if not recorded and self.keep is not None:
                m = {k: v for k, v in m.items() if k in self.keep}
            m = analyzer.counts_to_int(m)  # exact ints, whatever their device form
            last = i == len(self.rows) - 1
            out.append({"step": step, **m, **(self.extra if last else {})})
        return out

    def snapshots(self) -> list[tuple[int, Patterns]]:
        """``(step, masks)`` of each snapshot (after ``device_get``)."""
        at = lambda slot: jax.tree.map(lambda b: b[slot], self.masks)
        return [(step, self.masks if slot is None else at(slot)) for step, slot in self.snaps]


def _nonfinite(row: Mapping[str, Any]) -> list[str]:
    return [k for k in ("train/loss", "step/abs/all") if not np.isfinite(row.get(k, 0.0))]


class _Nothing:
    """Stands in for the writers in a process that writes nothing."""

    def write(self, rows) -> None:
        pass

    update = write

    def close(self) -> None:
        pass


class Fetcher:
    """Holds entries until the log cadence, then writes rows and mask snapshots."""

    def __init__(self, workdir: Path, start: int, num_steps: int, *, write: bool = True):
        self.workdir, self.pending, self.last_row, self.write = workdir, [], {}, write
        nothing = _Nothing()
        self.writer = records.MetricsWriter(workdir) if write else nothing
        self.scalars = live.Scalars(workdir, start) if write else nothing
        self.progress = live.Progress(num_steps, start) if write else nothing

    def add(self, entry: Entry) -> None:
        self.pending.append(entry)

    def flush(self, keep_last: bool) -> list[dict[str, Any]]:
        """Fetches and writes the held entries and returns their rows; FloatingPointError
        after a non-finite row, which is the last row written (a chunk's later steps are
        dropped: the K=1 records)."""
        ready = self.pending[:-1] if keep_last else self.pending
        self.pending = self.pending[len(ready) :]
        ready = jax.device_get(ready)
        rows = [row for entry in ready for row in entry.expand()]
        bad = next((r for r in rows if _nonfinite(r)), None)
        end = bad["step"] if bad else float("inf")
        rows = [r for r in rows if r["step"] <= end]
        for step, masks in (s for e in ready for s in e.snapshots()) if self.write else ():
            if step <= end:
                records.write_masks(self.workdir, step, masks)
        self.writer.write(rows)
        self.scalars.write(rows)
        self.last_row = rows[-1] if rows else self.last_row
        if bad:
            raise FloatingPointError(f"non-finite {_nonfinite(bad)} at step {end}; stopping")
        self.progress.update(rows)
        return rows

    def close(self) -> None:
        self.progress.close()
        self.writer.close()
        self.scalars.close()
