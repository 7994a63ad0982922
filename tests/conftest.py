"""Shared fixtures: tiny configs that run in a second or two on a CPU."""

from __future__ import annotations

import os

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


@pytest.fixture
def tiny():
    return tiny_config
