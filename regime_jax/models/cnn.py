"""ReLU convolutional network for sequences (1-D) or images (2-D).

Every ReLU is recorded: conv layers ``conv1`` .. ``convN`` at every spatial position
(``z`` is ``[B, length, C]`` or ``[B, height, width, C]``: units are channels, positions the
spatial axes), then dense layers ``fc1`` .. ``fcM`` (``z`` is ``[B, U]``). The ``head`` is linear.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from regime_jax.models.record import relu

POOLS = ("avg", "max", "none")
NORMS = ("layer", "none")


class CNN(nn.Module):
    """``[conv -> (norm) -> ReLU -> pool] * len(channels)``, flatten, recorded dense, ``head``.

    Normalization: ``norm="layer"`` applies LayerNorm over channels to the conv output before
    the ReLU, so the recorded pre-activation is the normalized value and a unit's bit depends
    on the other units (channels) at the same position of the same example. There is no batch
    norm: batch statistics would make one example's pattern depend on the rest of the batch.

    Pooling (window = stride = ``pool_size``, "VALID") follows each conv's ReLU; it is skipped
    for a layer whose spatial size is already smaller than ``pool_size``, so no layer shrinks
    below one position.

    Attributes:
      dims: 1 for sequences (``[B, L]`` or ``[B, L, C]``), 2 for images (``[B, H, W(, C)]``).
      channels: conv widths, recorded as ``conv1`` .. ``convN``.
      num_classes: output logits.
      kernel_size: conv window per spatial axis (padding "SAME").
      strides: conv stride per spatial axis.
      pool: "max" | "avg" | "none".
      pool_size: pooling window and stride per spatial axis.
      dense: hidden dense widths after flattening, recorded as ``fc1`` .. ``fcM``.
      norm: "none" | "layer" (LayerNorm over channels before each conv ReLU).
      dtype: None (float32) or ``jnp.bfloat16`` (``model.compute_dtype``): bfloat16 compute
        with float32 parameters; logits are returned in float32.
    """

    dims: int
    channels: Sequence[int]
    num_classes: int
    kernel_size: int = 3
    strides: int = 1
    pool: str = "max"
    pool_size: int = 2
    dense: Sequence[int] = (128,)
    norm: str = "none"
    dtype: Any = None

    def _as_image(self, x: jax.Array) -> jax.Array:
        """Returns ``[B, *spatial, C]``, adding a channel axis to ``[B, *spatial]``."""
        if self.dims not in (1, 2):
            raise ValueError(f"model.dims={self.dims!r} is unknown; allowed values: [1, 2]")
        if x.ndim == self.dims + 1:
            return x[..., None]
        if x.ndim == self.dims + 2:
            return x
        raise ValueError(
            f"CNN with dims={self.dims} expects inputs of rank {self.dims + 1} or "
            f"{self.dims + 2} (batch, spatial..., [channels]); got shape {x.shape}"
        )

    def _pool(self, h: jax.Array) -> jax.Array:
        if self.pool == "none" or min(h.shape[1:-1]) < self.pool_size:
            return h
        window = (self.pool_size,) * self.dims
        if self.pool == "max":
            return nn.max_pool(h, window, strides=window, padding="VALID")
        if self.pool == "avg":
            return nn.avg_pool(h, window, strides=window, padding="VALID")
        raise ValueError(f"model.pool={self.pool!r} is unknown; allowed values: {list(POOLS)}")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h_BxSxC = self._as_image(x)  # S: the spatial axes, L or H x W
        for i, width in enumerate(self.channels, start=1):
            conv = nn.Conv(
                width,
                kernel_size=(self.kernel_size,) * self.dims,
                strides=(self.strides,) * self.dims,
                padding="SAME",
                dtype=self.dtype,
                name=f"conv{i}",
            )
            z_BxSxC, site = conv(h_BxSxC), conv
            if self.norm == "layer":  # z then comes from the norm: recorded as norm<i>
                site = nn.LayerNorm(dtype=self.dtype, name=f"norm{i}")
                z_BxSxC = site(z_BxSxC)
            elif self.norm != "none":
                raise ValueError(
                    f"model.norm={self.norm!r} is unknown; allowed values: {list(NORMS)}"
                )
            h_BxSxC = self._pool(relu(site, z_BxSxC))
        h_BxD = h_BxSxC.reshape(h_BxSxC.shape[0], -1)
        for i, width in enumerate(self.dense, start=1):
            fc = nn.Dense(width, dtype=self.dtype, name=f"fc{i}")
            h_BxD = relu(fc, fc(h_BxD))
        logits_BxK = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(h_BxD)
        return logits_BxK if self.dtype is None else logits_BxK.astype(jnp.float32)
