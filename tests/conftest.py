"""Shared fixtures: tiny configs that run in a second or two on a CPU."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

from regime_jax.config import base_config
from regime_jax.sweep import apply_overrides


def tiny_config(**overrides):
    """MLP 40-16-16-10 on MNIST-1D: 12 steps, every step recorded and snapshotted."""
    c = base_config()
    c.model.hidden = (16, 12)
    c.batch_size, c.num_steps, c.probe.size = 32, 12, 24
    c.record.every_steps, c.record.snapshot_every_steps = 1, 1
    c.log_every_steps, c.eval_every_steps, c.eval_batch_size = 5, 6, 256
    apply_overrides(c, overrides, "tiny_config")
    return c


def wait_for_signal_handlers(proc, timeout_s: float = 60) -> None:
    """Waits until subprocess ``proc`` has installed its SIGTERM handler (or has exited).

    regime_jax's commands install their SIGINT and SIGTERM handlers together, first thing;
    Python's own SIGINT handler is there from the start, so SIGTERM is the one that tells.
    Linux only: reads SigCgt in /proc/<pid>/status.
    """
    deadline = time.time() + timeout_s
    while proc.poll() is None and time.time() < deadline:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        line = next(ln for ln in status.splitlines() if ln.startswith("SigCgt"))
        if int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1:
            return
        time.sleep(0.005)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (the files say null for non-finite numbers)")


def strict_json(text: str):
    """``json.loads`` that refuses ``NaN``, ``Infinity`` and ``-Infinity`` (invalid JSON)."""
    return json.loads(text, parse_constant=_no_constant)


HAS_PROC = Path("/proc/self/status").exists()


@pytest.fixture
def tiny():
    return tiny_config
