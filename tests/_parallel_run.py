"""Run by tests/test_parallel.py in a subprocess with 8 simulated CPU devices.

Trains the tiny config with ``parallel.devices`` = 1 and 8, counts traces of each step variant,
checks the placement of the arrays the loop builds, and prints one JSON object.
"""

from __future__ import annotations

import collections
import json
import os
import sys

import jax
import numpy as np
from conftest import tiny_config

from regime_jax import config as config_lib
from regime_jax import data, loop, models, step
from regime_jax.models.adapt import as_net


def main(workdir: str) -> None:
    out = {"devices": jax.local_device_count()}
    traces = collections.Counter()
    real_step = step.train_step

    def counting_step(*args, record, **kwargs):
        traces[record] += 1  # runs only while tracing
        return real_step(*args, record=record, **kwargs)

    step.train_step = counting_step
    for n in (1, 8):
        traces.clear()
        config = tiny_config(
            **{"parallel.devices": n, "record.every_steps": 2, "record.snapshot_every_steps": 2}
        )
        loop.train_and_evaluate(config, f"{workdir}/d{n}")
        out[f"traces_{n}"] = {str(k): v for k, v in traces.items()}
    step.train_step = real_step

    config = tiny_config(**{"parallel.devices": 8})
    place = loop.build(config).place
    ds = data.load_dataset(config.dataset)
    idx = data.probe_indices(len(ds.y_val), config.probe.size, config.probe.seed)
    probe = jax.device_put({"x": ds.x_val[idx], "y": ds.y_val[idx]}, place.data)
    net = as_net(models.create_model(config.model, ds.num_classes))
    tx = step.make_optimizer(config.optimizer, config.num_steps)
    init = jax.jit(
        lambda key, x: step.create_train_state(net, tx, key, x), out_shardings=place.replicated
    )
    state = init(jax.random.key(0), probe["x"])
    batch = jax.device_put(next(data.batches(ds, config.batch_size, 0)), place.data)
    state, metrics, _ = step.make_step_fns(net, tx)[True](state, batch, probe)
    leaf = jax.tree.leaves(state.params)[0]
    data_spec = jax.sharding.PartitionSpec("data")
    out["probe_on_data"] = probe["x"].sharding.spec == data_spec
    out["probe_shards"] = len(probe["x"].addressable_shards)
    out["batch_on_data"] = batch["x"].sharding.spec == data_spec
    out["params_replicated"] = bool(leaf.sharding.is_fully_replicated)
    out["params_devices"] = len(leaf.sharding.device_set)
    out["flip_is_scalar"] = np.ndim(metrics["flip/all"]) == 0
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
