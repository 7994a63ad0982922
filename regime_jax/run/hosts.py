"""Several processes (multi-host): start-up, who writes, each process's rows, one stop step.

A TPU slice or a GPU cluster runs one process per host, every one with the same command plus
``--distributed`` (README "Scale"). :func:`initialize` then calls
``jax.distributed.initialize()`` before anything touches a device, and the run adapts to
``jax.process_count() > 1`` on its own:

* The mesh spans every process's devices (:class:`regime_jax.run.step.Placement`), and
  :func:`put` hands JAX only this process's rows of a global batch: every process computes
  the same global batch (a pure function of ``(seed, step)``) and keeps the rows of its own
  devices (``jax.make_array_from_process_local_data``).
* Only process 0 (:func:`is_primary`) takes the workdir's lock and writes ``config.json``,
  ``metrics.jsonl``, mask snapshots, TensorBoard events, the summary and progress lines.
  Every process fetches the (replicated) metrics, so a non-finite value stops all of them at
  the same step.
* Every process calls orbax's save and restore, as orbax documents for multi-host: each
  writes its own shards and orbax's primary host commits the step. The workdir must be one
  directory every host sees (NFS, or a bucket mounted at the same path on every host).
* SIGTERM (preemption) goes through JAX's preemption sync point (:class:`SyncedStop`): every
  process stops after the same chunk, saves a checkpoint at that exact step and exits 143.
  SIGINT stops the process that receives it at once (like a kill: rerun to resume from the
  newest checkpoint).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize() -> None:
    """``jax.distributed.initialize()``: on Cloud TPU, Slurm or Open MPI every argument is
    detected; elsewhere set ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` in each process's environment."""
    env = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
    kwargs = {k: int(os.environ[v]) for k, v in env.items() if os.environ.get(v)}
    jax.distributed.initialize(**kwargs)


def is_primary() -> bool:
    """True in the process that writes the run's files (process 0; the only one, usually)."""
    return jax.process_index() == 0


def several() -> bool:
    return jax.process_count() > 1


def agree(value: int) -> int:
    """Process 0's ``value``, in every process (a collective: every process must call it)."""
    if not several():
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def barrier(name: str) -> None:
    """Waits until every process gets here (``name`` unique per use)."""
    if several():
        multihost_utils.sync_global_devices(name)


def put(tree: Any, sharding: Any) -> Any:
    """Host arrays (the same global values in every process) to device arrays on ``sharding``.

    None: the default device. One process: ``jax.device_put``. Several: each process passes
    only the rows its own devices hold.
    """
    if sharding is None:
        return jax.device_put(tree)
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda a: _from_process_rows(np.asarray(a), sharding), tree)


def _from_process_rows(a: np.ndarray, sharding: Any) -> jax.Array:
    """This process's slices of ``a`` on every sharded axis, concatenated in index order."""
    local = a
    index = list(sharding.addressable_devices_indices_map(a.shape).values())
    for axis, size in enumerate(a.shape):
        spans = sorted({s[axis].indices(size)[:2] for s in index})
        if spans != [(0, size)]:
            local = np.concatenate([local.take(range(lo, hi), axis) for lo, hi in spans], axis)
    return jax.make_array_from_process_local_data(sharding, local, a.shape)


def _reached_sync_point(count: int) -> bool:
    try:
        return multihost_utils.reached_preemption_sync_point(count)
    except RuntimeError:  # jax_enable_preemption_service=False: no preemption notices
        return False


class SyncedStop:
    """The loop's stop flag with several processes: JAX's preemption sync point.

    When any process receives SIGTERM, JAX's coordination service picks a sync point that
    every process reaches at the same call; :attr:`set` is that call, made once per chunk by
    every process (so its count is the chunk index, the same everywhere).
    """

    def __init__(self):
        self.signum: int | None = None
        self._calls = 0

    def __enter__(self) -> SyncedStop:
        return self

    def __exit__(self, *exc) -> None:
        pass

    @property
    def set(self) -> bool:
        """Polled once per chunk (a call of the sync point, counted)."""
        if self.signum is None and _reached_sync_point(self._calls):
            self.signum = signal.SIGTERM
        self._calls += 1
        return self.signum is not None
