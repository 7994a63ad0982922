"""ReLU multilayer perceptron; every hidden ReLU is recorded (``fc1``, ``fc2``, ...)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from regime_jax.models.record import relu


class MLP(nn.Module):
    """Flattens the input, then ``len(hidden)`` recorded ReLU layers and a linear ``head``.

    Attributes:
      hidden: widths of the hidden layers, recorded as ``fc1`` .. ``fcN``.
      num_classes: output logits.
    """

    hidden: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x_BxI: jax.Array) -> jax.Array:
        h_BxD = x_BxI.reshape(x_BxI.shape[0], -1)
        for i, width in enumerate(self.hidden, start=1):
            dense = nn.Dense(width, name=f"fc{i}")
            h_BxD = relu(dense, dense(h_BxD))
        return nn.Dense(self.num_classes, name="head")(h_BxD)
