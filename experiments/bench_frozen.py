r"""Benchmark (not a test): the frozen phase's steps/s, cached and gated, against full training.

COMMAND:
  python experiments/bench_frozen.py                       # main job, 8 rounds of 192 steps
  python experiments/bench_frozen.py --rounds 20 --steps 384 --k 1

Three engines of the main job (configs/mlp_mnist1d.py: MLP 40-256-256-10, batch 128, probe
512, every step recorded), timed on the loop's hot path as ``bench_throughput.py`` times it
(``Engine.advance`` per chunk, metrics fetched one call late on the log cadence into a
temporary workdir; no eval, stability test or checkpoint):

  full    ordinary training (no freeze)
  cached  the frozen phase with the gate cache (decouple.cache="auto"): gates frozen after
          the warm-up, every training example's gate bits cached, no gate forward
  gated   the frozen phase as it was (decouple.cache="off"): the gate network runs on the
          batch and on the probe set at every step

Rounds are interleaved (full, cached, gated, full, ...) in one process so the machine's drift
hits each alike. Prints steps/s per engine (median, min-max over rounds), the median of the
per-round ratios against full training, the cache's device bytes and its build time, and the
load average before and after (the machine may be shared).

EXPECTED (2 CPU cores, alone, 2026-12-08, load 0.5-1.0, --rounds 20 --steps 96, two runs):
full 1254 / 1307 steps/s, cached 1209 / 1272 (0.95x / 0.98x, per-round 0.84-1.11), gated
1041 / 1099 (0.83x / 0.84x); cache 288,768 bytes, built in 9-11 ms. The target is >= 1.0x;
what remains is the frozen rows' disagreement metric, ~22 us of device work a recorded step
(docs/results/decoupling.md, "What it says").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

from regime_jax import configs
from regime_jax.run import engine, fetch, loop


class Variant:
    """One engine (state, runner, batch stream, fetcher), advanced round by round."""

    def __init__(self, setup: loop.Setup, k: int, workdir: Path, total: int, freeze: bool):
        schedule = dataclasses.replace(  # the records' cadences only
            setup.schedule,
            num_steps=total + k,
            eval_every=0,
            stability_points=0,
            checkpoint_every=0,
            freeze_step=None,
            freeze_every=0,
            steps_per_call=k,
        )
        self.k, self.step, self.freeze = k, 0, freeze
        self.engine = engine.Engine(dataclasses.replace(setup, schedule=schedule))
        workdir.mkdir(parents=True)
        self.engine.prepare(workdir, 0, lengths={k})
        self.engine.fetcher.scalars.close()  # no TensorBoard view: the step's cost alone
        self.engine.fetcher.scalars = fetch._Nothing()

    def round(self, steps: int) -> float:
        """Seconds for ``steps`` steps, from the first batch to every row written."""
        eng = self.engine
        todo = list(itertools.islice(eng.schedule.chunks(self.step), steps // self.k))
        tic = time.perf_counter()
        with jax.transfer_guard_device_to_host("disallow"):
            for chunk in todo:
                eng.advance(chunk)
                eng.fetch(chunk, now=chunk is todo[-1])
                self.step = chunk.last
        jax.block_until_ready(eng.state)
        return time.perf_counter() - tic


def _setup(cache: str | None) -> loop.Setup:
    config = configs.load("mlp_mnist1d")
    if cache is not None:  # a run that may freeze (the freeze itself is the bench's)
        config.decouple.freeze_step = 1
        config.decouple.cache = cache
    return loop.build(config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=192, help="steps per round")
    p.add_argument("--k", type=int, default=1, help="steps_per_call (the main job's: 1)")
    args = p.parse_args()
    steps = args.steps - args.steps % args.k
    print(
        f"backend {jax.default_backend()}, {jax.device_count()} device(s): "
        f"{jax.devices()[0].device_kind}; python {sys.version.split()[0]}, jax {jax.__version__}"
    )
    load0 = os.getloadavg()
    names = {"full": None, "cached": "auto", "gated": "off"}
    total = args.k + (args.rounds + 1) * steps
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        variants = {}
        for name, cache in names.items():
            v = Variant(_setup(cache), args.k, Path(tmp) / name, total, cache is not None)
            v.round(steps)  # warm-up (ordinary steps: the gates are the trained params)
            if v.freeze:
                v.engine.freeze(v.step)
            variants[name] = v
        notes = variants["cached"].engine.clock.notes
        times = {name: [] for name in names}
        for _ in range(args.rounds):
            for name, v in variants.items():
                times[name].append(v.round(steps))
        for v in variants.values():
            v.engine.close()
    load1 = os.getloadavg()
    assert notes.get("frozen_path") == "cached", notes  # the cached engine took the cache
    rates = {name: [steps / t for t in ts] for name, ts in times.items()}
    print(
        f"main job (mlp_mnist1d), K={args.k}, {args.rounds} rounds x {steps} steps, "
        f"load average {load0[0]:.2f} before, {load1[0]:.2f} after"
    )
    for name, rs in rates.items():
        paired = [r / b for r, b in zip(rs, rates["full"], strict=True)]
        print(
            f"  {name:<6} {statistics.median(rs):8.1f} steps/s (min {min(rs):.1f}, max "
            f"{max(rs):.1f})   x{statistics.median(paired):.2f} vs full (per round: "
            + " ".join(f"{x:.2f}" for x in paired)
            + ")"
        )
    print(
        f"  cache: {notes['cache_bytes']} bytes on device (4000 training + 512 probe examples "
        f"x 512 units / 8), built in {notes['cache_build_seconds'] * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
