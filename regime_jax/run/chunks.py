"""Several steps per host call (``steps_per_call = K``): which steps run together, and running them.

A chunk is ``T`` consecutive steps in one jitted ``lax.scan``
(:func:`regime_jax.run.step.train_chunk`)
over ``T`` stacked batches. The host needs the state at the exact step of an eval, a
stability test, a checkpoint and the last step, so a chunk **ends** at each of those
(:func:`boundaries`). Between two such steps the span is cut into chunks of ``K`` steps, then
the remainder into descending powers of two (K=32, span 100: 32, 32, 32, 4). Chunk lengths
therefore come from ``{K} | {1, 2, 4, ... < K}``: at most ``1 + ceil(log2 K)`` distinct
lengths. :class:`Runner` compiles each length the plan uses once, before the first step
(one trace each); a length-1 chunk is the plain jitted step (two variants, record or not, as
with K=1, which is exactly the one-step-per-call loop).

Record and snapshot steps do not cut chunks: a chunk carries per-step record flags (a
``lax.cond`` per step unless every step records) and snapshot slots, so only the snapshot
steps' masks come back. The log cadence does not cut either: the host flushes after the first
chunk that reaches a log step. A SIGINT / SIGTERM stops the loop at the end of the current
chunk, an exact step with its checkpoint and every record up to it.

The cut is prefix-stable: the chunks after any chunk end are the chunks a run resumed there
plans, so a resumed run runs the chunks an uninterrupted one would.

>>> split(100, 32)
[32, 32, 32, 4]
>>> split(7, 8)
[4, 2, 1]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from regime_jax import data
from regime_jax.records import itstime
from regime_jax.run import hosts, step
from regime_jax.run.fetch import Entry


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Steps ``first .. first + length - 1`` in one host call."""

    first: int
    length: int

    @property
    def last(self) -> int:
        return self.first + self.length - 1

    @property
    def steps(self) -> range:
        return range(self.first, self.first + self.length)


def split(span: int, k: int) -> list[int]:
    """Chunk lengths covering ``span`` steps: ``K``s, then the remainder's powers of two."""
    rest = span % k
    return [k] * (span // k) + [1 << b for b in reversed(range(rest.bit_length())) if rest >> b & 1]


def boundaries(config: Any, start: int, stab_steps: frozenset[int]) -> list[int]:
    """Steps after ``start`` where a chunk must end: eval, stability, checkpoint, the last."""
    n = config.num_steps
    ends = {n, *(s for s in stab_steps if s > start)}
    for every in (config.eval_every_steps, config.checkpoint.every_steps):
        if every > 0:
            ends.update(range((start // every + 1) * every, n + 1, every))
    return sorted(ends)


def plan(start: int, ends: list[int], k: int) -> Iterator[Chunk]:
    """The chunks from ``start + 1`` to the last of ``ends`` (sorted steps > start)."""
    first = start + 1
    for end in ends:
        for length in split(end - first + 1, k):
            yield Chunk(first, length)
            first += length


def lengths(start: int, ends: list[int], k: int) -> set[int]:
    """The distinct chunk lengths :func:`plan` uses."""
    spans = np.diff([start, *ends])
    return {t for span in spans.tolist() for t in split(span, k)}


class Runner:
    """Runs a run's chunks: the plain jitted step for length 1, the compiled scan otherwise.

    A run that may freeze its gates (``setup.gated``) has both variants, ordinary and gated
    (:func:`regime_jax.run.step.train_step`), each compiled for every chunk length up front.
    """

    def __init__(self, setup: Any, state: Any, probe: Any, chunk_lengths: set[int]):
        c, self.place, self.probe = setup.config, setup.place, probe
        self.num_steps, self.record, self.snapshot = (
            c.num_steps,
            c.record.every_steps,
            c.record.snapshot_every_steps,
        )
        longest, every_record = max(chunk_lengths, default=1), self.record == 1
        self.slots = max(1, min(longest, -(-longest // self.snapshot) + 1))
        sample = next(data.batches(setup.ds, c.batch_size, c.seed))
        net, tx, loss_fn, rep = setup.net, setup.tx, setup.loss_fn, setup.place.replicated
        batch = self._abstract(sample, None)[0]
        self.step_fns, self.keep, self.compiled = {}, {}, {}
        for gated in (False, True) if setup.gated is not None else (False,):
            g = setup.gated if gated else None
            step_fns = step.make_step_fns(net, tx, loss_fn, rep, g)
            self.step_fns[gated] = {  # compiled now: no step of the run compiles
                record: step_fns[record].lower(state, batch, probe).compile()
                for record in (True, False)
                if record or not every_record
            }
            self.keep[gated] = None  # the keys of a non-record row, when a chunk mixes both
            if not every_record and longest > 1:
                norec = step_fns[False]
                self.keep[gated] = frozenset(jax.eval_shape(norec, state, sample, probe)[1])
            fn = step.make_chunk_fn(
                net,
                tx,
                loss_fn,
                every_record=every_record,
                slots=self.slots,
                out_shardings=rep,
                gated=g,
            )
            for t in sorted(chunk_lengths - {1}):  # before the first step: no mid-run compile
                self.compiled[gated, t] = fn.lower(state, *self._abstract(sample, t)).compile()

    def _abstract(self, sample: dict, t: int | None) -> tuple:
        """Shapes and shardings of a length-``t`` chunk's arguments after the state (None:
        one step's batch)."""
        lead, sharding = ((), self.place.data) if t is None else ((t,), self.place.chunk)
        stacked = {
            k: jax.ShapeDtypeStruct((*lead, *np.shape(v)), v.dtype, sharding=sharding)
            for k, v in sample.items()
        }
        rep = self.place.replicated
        flags = [jax.ShapeDtypeStruct((t,), d, sharding=rep) for d in (np.bool_, np.int32)]
        return (stacked, self.probe, *flags)

    def flags(self, chunk: Chunk) -> tuple[list[bool], list[int]]:
        """Per step: records or not; its snapshot slot (``slots``: no snapshot)."""
        n, record, slot, used = self.num_steps, [], [], 0
        for s in chunk.steps:
            record.append(itstime(s, self.record, n))
            snap = record[-1] and itstime(s, self.snapshot, n)
            slot.append(used if snap else self.slots)
            used += snap
        return record, slot

    def __call__(
        self, state: Any, chunk: Chunk, batches: Iterator[dict], *, gated: bool = False
    ) -> tuple[Any, Entry]:
        """Dispatches the chunk's steps: ``(state, entry)``, device arrays, nothing fetched.

        The entry has a row for each record step; :meth:`Entry.with_extra` adds the last
        step's eval / stability metrics (and its row). ``gated``: the state's gates are frozen.
        """
        record, slot = self.flags(chunk)
        if chunk.length == 1:
            batch = hosts.put(next(batches), self.place.data)
            state, metrics, masks = self.step_fns[gated][record[0]](state, batch, self.probe)
            snapshot = slot[0] < self.slots
            entry = Entry.step(chunk.first, metrics, masks, record=record[0], snapshot=snapshot)
            return state, entry
        host = [next(batches) for _ in chunk.steps]
        batch_TxB = hosts.put(
            {k: np.stack([b[k] for b in host]) for k in host[0]}, self.place.chunk
        )
        flags = hosts.put((np.array(record), np.array(slot, np.int32)), self.place.replicated)
        state, metrics_T, snaps_S = self.compiled[gated, chunk.length](
            state, batch_TxB, self.probe, *flags
        )
        steps = list(chunk.steps)
        rows = tuple((s, i, True) for i, s in enumerate(steps) if record[i])
        snaps = tuple((s, slot[i]) for i, s in enumerate(steps) if slot[i] < self.slots)
        tail = (chunk.last, chunk.length - 1, record[-1])
        return state, Entry(rows, metrics_T, {}, snaps, snaps_S, self.keep[gated], tail)
