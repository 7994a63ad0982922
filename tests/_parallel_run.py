"""Run by tests/run/test_parallel.py in a subprocess with 8 simulated CPU devices.

Trains one small config four ways, ``(parallel.devices, steps_per_call)`` in (1, 1), (8, 1),
(1, 8) and (8, 8); counts the traces of the step variants and of each chunk length; checks
the placement of the arrays the loop builds; prints one JSON object.
"""

from __future__ import annotations

import collections
import json
import os
import sys

import jax
import numpy as np
from conftest import tiny_config

from regime_jax import data as data_lib
from regime_jax import models
from regime_jax.configs import base as config_lib
from regime_jax.models.adapt import as_net
from regime_jax.run import hosts, loop, step
from regime_jax.schedule import Schedule

# 23 steps, eval every 10: spans 10, 10, 3, so K=8 runs chunks of 8, 2 and 1 steps; every
# second step records, so a chunk mixes record and non-record steps.
RUN = {
    "num_steps": 23,
    "eval_every_steps": 10,
    "record.every_steps": 2,
    "record.snapshot_every_steps": 4,
}
VARIANTS = ((1, 1), (8, 1), (1, 8), (8, 8))


def _counting(out: dict) -> None:
    """Counts traces of train_step (per record flag) and train_chunk (per length T)."""
    steps, lengths = collections.Counter(), collections.Counter()
    real_step, real_chunk = step.train_step, step.train_chunk

    def counting_step(*args, record, **kwargs):
        steps[str(record)] += 1  # runs only while tracing
        return real_step(*args, record=record, **kwargs)

    def counting_chunk(state, batch_TxB, *args, **kwargs):
        lengths[str(batch_TxB["x"].shape[0])] += 1
        return real_chunk(state, batch_TxB, *args, **kwargs)

    step.train_step, step.train_chunk = counting_step, counting_chunk
    try:
        for devices, k in VARIANTS:
            steps.clear()
            lengths.clear()
            overrides = {**RUN, "parallel.devices": devices, "steps_per_call": k}
            loop.train_and_evaluate(tiny_config(**overrides), f"{out['workdir']}/d{devices}k{k}")
            out[f"step_traces_d{devices}k{k}"] = dict(steps)
            out[f"chunk_traces_d{devices}k{k}"] = dict(lengths)
    finally:
        step.train_step, step.train_chunk = real_step, real_chunk
    planned = Schedule.from_config(tiny_config(**RUN, steps_per_call=8))
    out["planned_lengths"] = sorted(planned.chunk_lengths(0))


def _placement(out: dict) -> None:
    """The arrays a step and a chunk take and give, on 8 devices."""
    config = tiny_config(**{"parallel.devices": 8})
    place = loop.build(config).place
    ds = data_lib.load_dataset(config.dataset)
    idx = data_lib.probe_indices(len(ds.y_val), config.probe.size, config.probe.seed)
    probe = hosts.put({"x": ds.x_val[idx], "y": ds.y_val[idx]}, place.data)
    net = as_net(models.create_model(config.model, ds.num_classes))
    tx = step.make_optimizer(config.optimizer, config.num_steps)
    init = jax.jit(
        lambda key, x: step.create_train_state(net, tx, key, x), out_shardings=place.replicated
    )
    state = init(jax.random.key(0), probe["x"])
    batches = data_lib.batches(ds, config.batch_size, 0)
    batch = hosts.put(next(batches), place.data)
    state, metrics, _ = step.make_step_fns(net, tx, out_shardings=place.replicated)[True](
        state, batch, probe
    )
    leaf = jax.tree.leaves(state.params)[0]
    data_spec = jax.sharding.PartitionSpec("data")
    out["probe_on_data"] = probe["x"].sharding.spec == data_spec
    out["probe_shards"] = len(probe["x"].addressable_shards)
    out["batch_on_data"] = batch["x"].sharding.spec == data_spec
    out["params_replicated"] = bool(leaf.sharding.is_fully_replicated)
    out["params_devices"] = len(leaf.sharding.device_set)
    out["flip_is_scalar"] = np.ndim(metrics["flip/all"]) == 0
    host = [next(batches) for _ in range(4)]
    stacked = hosts.put({k: np.stack([b[k] for b in host]) for k in host[0]}, place.chunk)
    flags = hosts.put((np.ones(4, bool), np.array([0, 2, 2, 1], np.int32)), place.replicated)
    chunk_fn = step.make_chunk_fn(
        net, tx, every_record=True, slots=2, out_shardings=place.replicated
    )
    state, metrics_T, snaps_S = chunk_fn(state, stacked, probe, *flags)
    chunk_spec = jax.sharding.PartitionSpec(None, "data")
    out["chunk_batch_on_data"] = stacked["x"].sharding.spec == chunk_spec
    out["chunk_batch_shards"] = len(stacked["x"].addressable_shards)
    out["chunk_batch_shard_shape"] = list(stacked["x"].addressable_shards[0].data.shape)
    out["chunk_flip_shape"] = list(metrics_T["flip/all"].shape)
    out["chunk_flip_replicated"] = bool(metrics_T["flip/all"].sharding.is_fully_replicated)
    snap = jax.tree.leaves(snaps_S)[0]
    out["chunk_snaps_shape"] = [snap.shape[0], snap.shape[1]]
    out["chunk_params_replicated"] = bool(
        jax.tree.leaves(state.params)[0].sharding.is_fully_replicated
    )


def main(workdir: str) -> None:
    out = {"devices": jax.local_device_count(), "workdir": workdir}
    _counting(out)
    _placement(out)
    for n in (3, 16):
        try:
            loop.build(tiny_config(**{"parallel.devices": n}))
            out[f"error_{n}"] = None
        except config_lib.ConfigError as err:
            out[f"error_{n}"] = str(err)
    print(json.dumps(out))


if __name__ == "__main__":
    # Before the first device query (JAX reads these when its backend starts), and only here:
    # importing this file (pytest's doctest collection does) changes nothing.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(__file__))
    main(sys.argv[1])
