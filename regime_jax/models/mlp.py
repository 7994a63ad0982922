"""ReLU multilayer perceptron; every hidden ReLU is recorded (``fc1``, ``fc2``, ...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from regime_jax.models.record import relu


class MLP(nn.Module):
    """Flattens the input, then ``len(hidden)`` recorded ReLU layers and a linear ``head``.

    Attributes:
      hidden: widths of the hidden layers, recorded as ``fc1`` .. ``fcN``.
      num_classes: output logits.
      dtype: None (float32) or ``jnp.bfloat16`` (``model.compute_dtype``): bfloat16 compute
        with float32 parameters; logits are returned in float32.
    """

    hidden: Sequence[int]
    num_classes: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x_BxI: jax.Array) -> jax.Array:
        h_BxD = x_BxI.reshape(x_BxI.shape[0], -1)
        for i, width in enumerate(self.hidden, start=1):
            dense = nn.Dense(width, dtype=self.dtype, name=f"fc{i}")
            h_BxD = relu(dense, dense(h_BxD))
        logits_BxK = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(h_BxD)
        return logits_BxK if self.dtype is None else logits_BxK.astype(jnp.float32)
