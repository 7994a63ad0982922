"""Under the loop: a run's train state on device and everything that computes on it.

An :class:`Engine` holds the probe set on device and the state (step 0's, or a restored one);
:meth:`Engine.prepare` compiles, before the first step, the chunk runner
(:class:`~regime_jax.run.chunks.Runner`), evaluation, the stability test and the freeze, and
opens the fetcher (:class:`~regime_jax.run.fetch.Fetcher`) and the phase clock. Then one
:meth:`Engine.advance` per chunk of the run's :class:`~regime_jax.schedule.Schedule` runs the
chunk with its last step's stability test and eval, and :meth:`Engine.fetch` writes the rows on
the log cadence, one call late. Which steps do what is the schedule's; the loop
(:mod:`regime_jax.run.loop`) keeps the lock, resume, the freeze policy, checkpoints and signals.

A script drives it as the loop does (``experiments/bench_throughput.py``)::

    engine = Engine(loop.build(config))
    engine.prepare(workdir, 0)
    engine.record_initial()
    for chunk in engine.schedule.chunks(0):
        engine.advance(chunk)
        engine.fetch(chunk, now=chunk.last == engine.schedule.num_steps)
    engine.close()
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from regime_jax import analyzer, bitmask, capture, data, gating, stability
from regime_jax.run import chunks, fetch, hosts, live, step
from regime_jax.run.step import TrainState
from regime_jax.schedule import Chunk


def stability_config(config: ml_collections.ConfigDict) -> stability.StabilityConfig:
    """The stability test's static settings from ``config.stability``."""
    extra = ("num_points", "num_examples", "seed")
    return stability.StabilityConfig(
        **{k: v for k, v in config.stability.items() if k not in extra}
    )


def _stability_of_modes(params, x, key, variables, *, net, config) -> dict:
    """The stability test of a model with a train mode: its params perturbed, in eval mode."""
    preacts_fn = lambda p, x: net.preacts_fn(net.modes.join(p, variables), x)
    return stability.perturbation_metrics(preacts_fn, params, x, key, config)


def _fill_rows(buf: dict, gates: Any, x: jax.Array, start: jax.Array, *, net: Any) -> dict:
    """``buf`` (``{layer: uint8 [N, ...]}``) with rows ``start ..`` set to the gates' packed
    bits on ``x``."""
    bits = net.gate_bits(gates, x)
    put = jax.lax.dynamic_update_slice_in_dim
    return {k: put(b, bits[k].bits, start, 0) for k, b in buf.items()}


class Engine:
    """A run's state and its compiled computations; see the module doc.

    Args:
      setup: a :class:`regime_jax.run.loop.Setup` (its ``schedule`` says what happens when).

    Attributes:
      state: the train state on device (step 0's until :meth:`resume`).
      frozen: on the host, whether the state's gates are frozen.
    """

    def __init__(self, setup: Any):
        self.setup, self.config, self.schedule = setup, setup.config, setup.schedule
        ds, place = setup.ds, setup.place
        probe = {"x": ds.x_val[setup.probe_idx], "y": ds.y_val[setup.probe_idx]}
        self.probe = hosts.put(probe, place.data)
        init_fn = jax.jit(
            functools.partial(
                step.create_train_state,
                setup.net,
                setup.tx,
                decoupled=setup.gated_net is not None,
                monitor_options=step.monitor_options_of(self.config),
            ),
            out_shardings=place.replicated,
        )
        self.state: TrainState = init_fn(jax.random.key(self.config.seed), self.probe["x"])
        self.frozen = False
        self.fetcher: fetch.Fetcher | None = None
        self.clock: live.PhaseClock | None = None

    def resume(self, state: TrainState) -> None:
        """Continues from ``state`` (a restored checkpoint's), frozen or not as it says."""
        self.state = state
        if self.setup.gated_net is not None:
            self.frozen = bool(jax.device_get(state.frozen.on))

    def site_table(self) -> tuple[str, list[dict]] | None:
        """Every ReLU site found, as text and as rows (None: a hand-built ``preacts_fn``)."""
        sites_fn = getattr(self.setup.net.preacts_fn, "sites", None)
        if sites_fn is None:
            return None
        table = sites_fn(step.model_variables(self.setup.net, self.state), self.probe["x"])
        return capture.format_sites(table), [dataclasses.asdict(site) for site in table]

    # ------------------------------------------------------------------ before the first step

    def prepare(
        self, workdir: Path, start: int, *, write: bool = True, lengths: set[int] | None = None
    ) -> None:
        """Opens the fetcher and the clock at ``start`` and compiles everything the steps
        after it run (``lengths``: the chunk lengths, default the schedule's)."""
        s = self.setup
        self.fetcher = fetch.Fetcher(workdir, start, self.schedule.num_steps, write=write)
        self.clock = live.PhaseClock(workdir, start, write=write)
        self._compile_eval()
        self._compile_stability()
        self.freeze_fn = jax.jit(
            functools.partial(
                step.freeze, model=s.net, monitor_options=step.monitor_options_of(s.config)
            ),
            donate_argnames="state",
            out_shardings=s.place.replicated,
        )
        if lengths is None:
            lengths = self.schedule.chunk_lengths(start)
        cache_shape = self._compile_cache()
        self.runner = chunks.Runner(s, self.state, self.probe, lengths, cache_shape)
        self.batches = self._batches(start)
        if self.frozen:  # resumed after the freeze: the cache is rebuilt, never checkpointed
            self._build_cache()

    def _batches(self, start: int):
        """The batches from ``start``: the cached frozen phase's are indices alone."""
        s, c = self.setup, self.config
        cached = s.masked_net is not None
        examples = not (cached and self.frozen)
        return data.batches(
            s.ds, c.batch_size, c.seed, start_step=start, index=cached, examples=examples
        )

    def _compile_cache(self) -> step.GateCache | None:
        """The gate cache's builders, compiled now; the cache's shapes (None: not cached)."""
        s = self.setup
        if s.masked_net is None:
            return None
        x, gates, rep = s.ds.x_train, self.state.frozen.gates, s.place.replicated
        x1 = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
        # a chunk's float32 pre-activations (32 x their bits) within the probe chunk's budget
        per_example = 32 * gating.gate_bits_per_example(s.net, gates, x1)
        self.cache_chunk = analyzer.probe_chunk_size(per_example, len(x), "auto")
        x_c = jax.ShapeDtypeStruct((self.cache_chunk, *x.shape[1:]), x.dtype)
        like = jax.eval_shape(s.masked_net.gate_bits, gates, x_c)
        shapes = {k: ((len(x), *p.bits.shape[1:]), p.bits.dtype) for k, p in like.items()}
        train = {k: jax.ShapeDtypeStruct(*a, sharding=rep) for k, a in shapes.items()}
        fill = functools.partial(_fill_rows, net=s.masked_net)
        fill = jax.jit(fill, donate_argnames="buf", out_shardings=rep)
        self.cache_fill = fill.lower(train, gates, x_c, np.int32(0)).compile()
        zeros = lambda: {k: jnp.zeros(*a) for k, a in shapes.items()}
        self.cache_zeros = jax.jit(zeros, out_shardings=rep).lower().compile()
        probe_bits = jax.jit(s.masked_net.gate_bits, out_shardings=rep)
        self.cache_probe = probe_bits.lower(gates, self.probe["x"]).compile()
        self.cache_units = {k: p.units for k, p in like.items()}
        probe_like = jax.eval_shape(s.masked_net.gate_bits, gates, self.probe["x"])
        as_rep = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep)
        return step.GateCache(
            {k: bitmask.Packed(a, self.cache_units[k]) for k, a in train.items()},
            jax.tree.map(as_rep, probe_like),
            as_rep(x),
            as_rep(s.ds.y_train),
        )

    def _build_cache(self) -> None:
        """The frozen gates' bits of every training example and of the probe set, on device,
        a chunk at a time (memory: the cache and one chunk's forward), and the training split
        on device (the cached steps gather their batches there)."""
        if self.setup.masked_net is None:
            return
        start_s = time.perf_counter()
        x, gates, c = self.setup.ds.x_train, self.state.frozen.gates, self.cache_chunk
        buf = self.cache_zeros()
        for start in range(0, len(x), c):
            at = min(start, len(x) - c)  # the last chunk overlaps the one before: no padding
            chunk = hosts.put(x[at : at + c], self.setup.place.replicated)
            buf = self.cache_fill(buf, gates, chunk, np.int32(at))
        units, ds, rep = self.cache_units, self.setup.ds, self.setup.place.replicated
        cache = step.GateCache(
            {k: bitmask.Packed(b, units[k]) for k, b in buf.items()},
            self.cache_probe(gates, self.probe["x"]),
            *hosts.put((ds.x_train, ds.y_train), rep),
        )
        jax.block_until_ready(cache)
        self.runner.set_cache(cache)
        self.clock.note(
            frozen_path="cached",
            cache_bytes=cache.num_bytes,
            data_bytes=cache.x.nbytes + cache.y.nbytes,
            cache_build_seconds=time.perf_counter() - start_s,
            why=self.setup.frozen_path,
        )

    def _compile_eval(self) -> None:
        """Evaluation, compiled before the first step like the steps (both variants of a run
        that may freeze)."""
        s = self.setup
        batches = step.eval_batches(
            s.ds.x_val, s.ds.y_val, self.config.eval_batch_size, s.place.data
        )
        self.eval_batches, self.eval_fns = batches, {}
        for frozen in (False, True) if s.gated_net is not None else (False,):
            fn = functools.partial(
                step.eval_step,
                model=s.net,
                loss_fn=s.loss_fn,
                gated_net=s.gated_net if frozen else None,
            )
            gates = self.state.frozen.gates if frozen else None
            variables = step.model_variables(s.net, self.state)  # the params, or eval mode's
            lowered = jax.jit(fn).lower(variables, batches[0], gates=gates)
            self.eval_fns[frozen] = lowered.compile()

    def _compile_stability(self) -> None:
        s, c = self.setup, self.config
        if s.net.modes is None:
            fn = functools.partial(
                stability.perturbation_metrics, s.net.preacts_fn, config=stability_config(c)
            )
        else:  # the params perturbed, the model's other variables as they are (eval mode)
            fn = functools.partial(_stability_of_modes, net=s.net, config=stability_config(c))
        self.stab_fn = jax.jit(fn)
        self.stab_x = self.probe["x"][: c.stability.num_examples or None]
        self.stab_key = jax.random.key(c.stability.seed)

    # ------------------------------------------------------------------ the steps

    def evaluate(self, state: TrainState) -> dict:
        """Device-side ``eval/*`` of ``state`` (the gated network once frozen)."""
        s = self.setup
        gates = state.frozen.gates if self.frozen else None
        fn = functools.partial(self.eval_fns[self.frozen], gates=gates)
        variables = step.model_variables(s.net, state)
        return step.evaluate(fn, variables, self.eval_batches, len(s.ds.y_val))

    def stability_test(self, step_: int, state: TrainState) -> dict:
        """Device-side ``stability/*`` of ``state`` if the schedule tests at ``step_``, else {}."""
        if not self.schedule.tests_stability(step_):
            return {}
        key = jax.random.fold_in(self.stab_key, step_)
        model_state = step.model_state_of(state)
        if model_state is None:
            return self.stab_fn(state.params, self.stab_x, key)
        return self.stab_fn(state.params, self.stab_x, key, model_state.variables)

    def record_initial(self) -> list[dict]:
        """Step 0's row and snapshot (the initial state), written now."""
        state = self.state
        metrics = {
            **analyzer.pattern_metrics(None, state.masks),
            **self.evaluate(state),
            **self.stability_test(0, state),
        }
        self.fetcher.add(fetch.Entry.step(0, metrics, state.masks, record=True, snapshot=True))
        return self.fetcher.flush(keep_last=False)

    def advance(self, chunk: Chunk) -> None:
        """Runs ``chunk``'s steps, then its last step's stability test and eval, as the
        schedule says; everything stays on device, held for :meth:`fetch`."""
        last, schedule = chunk.last, self.schedule
        self.state, entry = self.runner(self.state, chunk, self.batches, frozen=self.frozen)
        self.clock.tick(self.state, last, "gated" if self.frozen else "ordinary")
        if last == schedule.num_steps or (not self.frozen and schedule.may_freeze(last)):
            self.clock.mark(self.state, last)
        extra = self.stability_test(last, self.state)
        if schedule.evals(last):
            extra = {**extra, **self.evaluate(self.state)}
        self.fetcher.add(entry.with_extra(extra))

    def fetch(self, chunk: Chunk, *, now: bool = False) -> list[dict]:
        """The rows written after ``chunk``: every held one ``now`` (a checkpoint or a freeze
        decision follows), on the log cadence all but the newest call's (one call late),
        else none. FloatingPointError after a non-finite row."""
        if now or self.schedule.logs_within(chunk):
            return self.fetcher.flush(keep_last=not now)
        return []

    def freeze(self, step_: int) -> None:
        """Freezes the gates after ``step_`` (the ordinary phase's clock stops there) and
        builds the gate cache of the cached frozen phase (outside both phases' clocks)."""
        self.clock.stop(self.state, step_)
        self.state = self.freeze_fn(self.state, self.probe["x"])
        self.frozen = True
        self._build_cache()
        if self.setup.masked_net is not None:
            self.batches = self._batches(step_)  # step_'s batch is the next one
        if self.setup.masked_net is None:
            self.clock.note(frozen_path="gated", why=self.setup.frozen_path)

    def stop_clock(self, step_: int) -> None:
        """The running phase ends at ``step_`` (the last step, or an interruption)."""
        self.clock.stop(self.state, step_)

    @property
    def last_row(self) -> dict:
        return self.fetcher.last_row if self.fetcher is not None else {}

    def close(self) -> None:
        """Writes ``timing.json`` and closes the fetcher's files (whatever was opened)."""
        if self.clock is not None:
            self.clock.write()
        if self.fetcher is not None:
            self.fetcher.close()
