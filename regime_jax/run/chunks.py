"""Several steps per host call (``steps_per_call = K``): running a run's chunks.

A chunk is ``T`` consecutive steps in one jitted ``lax.scan``
(:func:`regime_jax.run.step.train_chunk`) over ``T`` stacked batches. Which steps run together
is the run's :class:`~regime_jax.schedule.Schedule`'s (:meth:`~regime_jax.schedule.Schedule.chunks`:
a chunk ends at each eval, stability test, checkpoint, possible freeze and the last step, and
between them the span is cut into chunks of ``K``, then the remainder's powers of two).
:class:`Runner` compiles each length the plan uses once, before the first step (one trace
each); a length-1 chunk is the plain jitted step (two variants, record or not, as with K=1,
which is exactly the one-step-per-call loop).

Record and snapshot steps do not cut chunks: a chunk carries per-step record flags (a
``lax.cond`` per step unless every step records) and snapshot slots, so only the snapshot
steps' masks come back. The log cadence does not cut either: the host flushes after the first
chunk that reaches a log step. A SIGINT / SIGTERM stops the loop at the end of the current
chunk, an exact step with its checkpoint and every record up to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from regime_jax import data
from regime_jax.run import hosts, step
from regime_jax.run.fetch import Entry
from regime_jax.schedule import Chunk


class Runner:
    """Runs a run's chunks: the plain jitted step for length 1, the compiled scan otherwise.

    A run that may freeze its gates (``setup.gated_net``) has both variants, ordinary and
    frozen (:func:`regime_jax.run.step.train_step` through the gated net), each compiled for
    every chunk length up front.
    """

    def __init__(
        self,
        setup: Any,
        state: Any,
        probe: Any,
        chunk_lengths: set[int],
        cache: Any = None,
    ):
        c, self.place = setup.config, setup.place
        self.schedule = setup.schedule
        longest = max(chunk_lengths, default=1)
        every_record = self.schedule.record_every == 1
        self.slots = self.schedule.most_snapshots(longest)
        cached = setup.masked_net is not None
        # the cached frozen phase reads the gate cache (probe["cache"]) at the batch's indices
        self.probes = {False: probe, True: probe | {"cache": cache} if cached else probe}
        self.indexed = {False: False, True: cached}
        sample = next(data.batches(setup.ds, c.batch_size, c.seed, index=cached))
        net, tx, loss_fn, rep = setup.net, setup.tx, setup.loss_fn, setup.place.replicated
        self.step_fns, self.keep, self.compiled = {}, {}, {}
        for frozen in (False, True) if setup.gated_net is not None else (False,):
            gated_net = setup.gated_net if frozen else None
            masked_net = setup.masked_net if frozen else None
            probe_f, sample_f = self.probes[frozen], self._batch(sample, frozen)
            batch = self._abstract(sample_f, None, probe_f)[0]
            options = step.monitor_options_of(c)
            step_fns = step.make_step_fns(
                net,
                tx,
                loss_fn,
                rep,
                gated_net,
                monitor_options=options,
                masked_net=masked_net,
                stack_metrics=True,
            )
            self.step_fns[frozen] = {  # compiled now: no step of the run compiles
                record: step_fns[record].lower(state, batch, probe_f).compile()
                for record in (True, False)
                if record or not every_record
            }
            self.keep[frozen] = None  # the keys of a non-record row, when a chunk mixes both
            if not every_record and longest > 1:
                norec = step_fns[False]
                self.keep[frozen] = jax.eval_shape(norec, state, sample_f, probe_f)[1].keys()
            fn = step.make_chunk_fn(
                net,
                tx,
                loss_fn,
                every_record=every_record,
                slots=self.slots,
                out_shardings=rep,
                gated_net=gated_net,
                monitor_options=options,
                masked_net=masked_net,
                stack_metrics=True,
            )
            for t in sorted(chunk_lengths - {1}):  # before the first step: no mid-run compile
                self.compiled[frozen, t] = fn.lower(
                    state, *self._abstract(sample_f, t, probe_f)
                ).compile()

    def set_cache(self, cache: Any) -> None:
        """The frozen gates' :class:`~regime_jax.run.step.GateCache`, built at the freeze."""
        if self.indexed[True]:
            self.probes[True] = self.probes[True] | {"cache": cache}

    def _batch(self, batch: dict, frozen: bool) -> dict:
        """The batch as the phase's step takes it: the cached path takes the indices alone (its
        data is on device), the others the examples."""
        if self.indexed[frozen]:
            return {"idx": batch["idx"]}
        return {k: v for k, v in batch.items() if k != "idx"}

    def _abstract(self, sample: dict, t: int | None, probe: Any) -> tuple:
        """Shapes and shardings of a length-``t`` chunk's arguments after the state (None:
        one step's batch)."""
        lead, sharding = ((), self.place.data) if t is None else ((t,), self.place.chunk)
        stacked = {
            k: jax.ShapeDtypeStruct((*lead, *np.shape(v)), v.dtype, sharding=sharding)
            for k, v in sample.items()
        }
        rep = self.place.replicated
        flags = [jax.ShapeDtypeStruct((t,), d, sharding=rep) for d in (np.bool_, np.int32)]
        return (stacked, probe, *flags)

    def flags(self, chunk: Chunk) -> tuple[list[bool], list[int]]:
        """Per step: records or not; its snapshot slot (``slots``: no snapshot)."""
        record, snapshot = self.schedule.flags(chunk)
        slot, used = [], 0
        for snap in snapshot:
            slot.append(used if snap else self.slots)
            used += snap
        return record, slot

    def __call__(
        self, state: Any, chunk: Chunk, batches: Iterator[dict], *, frozen: bool = False
    ) -> tuple[Any, Entry]:
        """Dispatches the chunk's steps: ``(state, entry)``, device arrays, nothing fetched.

        The entry has a row for each record step; :meth:`Entry.with_extra` adds the last
        step's eval / stability metrics (and its row). ``frozen``: the state's gates are frozen.
        """
        record, slot = self.flags(chunk)
        probe = self.probes[frozen]
        if chunk.length == 1:
            batch = hosts.put(self._batch(next(batches), frozen), self.place.data)
            state, metrics, masks = self.step_fns[frozen][record[0]](state, batch, probe)
            snapshot = slot[0] < self.slots
            entry = Entry.step(chunk.first, metrics, masks, record=record[0], snapshot=snapshot)
            return state, entry
        host = [self._batch(next(batches), frozen) for _ in chunk.steps]
        batch_TxB = hosts.put(
            {k: np.stack([b[k] for b in host]) for k in host[0]}, self.place.chunk
        )
        flags = hosts.put((np.array(record), np.array(slot, np.int32)), self.place.replicated)
        state, metrics_T, snaps_S = self.compiled[frozen, chunk.length](
            state, batch_TxB, probe, *flags
        )
        steps = list(chunk.steps)
        rows = tuple((s, i, True) for i, s in enumerate(steps) if record[i])
        snaps = tuple((s, slot[i]) for i, s in enumerate(steps) if slot[i] < self.slots)
        tail = (chunk.last, chunk.length - 1, record[-1])
        return state, Entry(rows, metrics_T, {}, snaps, snaps_S, self.keep[frozen], tail)
