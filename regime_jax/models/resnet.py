"""ResNet (basic blocks, BatchNorm, identity / projection shortcuts) with a CIFAR-style stem.

ResNet-18 is ``stage_sizes=(2, 2, 2, 2)``, ``width=64`` (He et al., 2016, with the CIFAR stem
of their section 4.2 and of most CIFAR-10 reproductions): a 3x3 stride-1 conv, no max pool,
then four stages of basic blocks at widths ``width * (1, 2, 4, 8)``, the first block of
stages 2.. striding by 2 with a 1x1 projection shortcut; global average pool, linear ``head``.

Every ReLU is recorded, at every spatial position (units: channels):

* ``stem_bn``: ``z = BN(conv(x))`` of the stem, ``[B, H, W, width]``;
* ``stage{s}_block{b}/bn1``: the block's first ReLU, ``z = BN(conv1(h))``;
* ``stage{s}_block{b}``: the block's output ReLU, ``z = BN(conv2(.)) + shortcut(h)`` (the
  residual sum; named after the block, as :func:`regime_jax.capture_relus` names it).

BatchNorm makes the model stateful: ``__call__`` takes ``train``; the built-in loop trains
with ``train=True`` (batch statistics, ``batch_stats`` updated and carried in the train
state) and reads the probe set, evaluation and the stability test with ``train=False`` (the
running statistics), so one probe example's pattern never depends on the other examples
(:mod:`regime_jax.models.adapt`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from regime_jax.models.record import relu


class BasicBlock(nn.Module):
    """``relu(BN(conv2(relu(BN(conv1(h))))) + shortcut(h))``; 3x3 convs, no bias."""

    width: int
    strides: int = 1
    dtype: Any = None

    @nn.compact
    def __call__(self, h_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
        conv = lambda width, k, s, name: nn.Conv(
            width, (k, k), (s, s), padding="SAME", use_bias=False, dtype=self.dtype, name=name
        )
        norm = lambda name: nn.BatchNorm(
            use_running_average=not train, momentum=0.9, dtype=self.dtype, name=name
        )
        bn1 = norm("bn1")
        y = relu(bn1, bn1(conv(self.width, 3, self.strides, "conv1")(h_BxHxWxC)))
        y = norm("bn2")(conv(self.width, 3, 1, "conv2")(y))
        shortcut = h_BxHxWxC
        if self.strides != 1 or h_BxHxWxC.shape[-1] != self.width:
            shortcut = norm("proj_bn")(conv(self.width, 1, self.strides, "proj_conv")(shortcut))
        return relu(self, y + shortcut)


class ResNet(nn.Module):
    """CIFAR-style ResNet classifier (``stage_sizes=(2, 2, 2, 2)``: ResNet-18).

    Attributes:
      num_classes: output logits.
      stage_sizes: basic blocks per stage; stage ``s`` (1-based) has width
        ``width * 2**(s-1)`` and strides by 2 in its first block for ``s > 1``.
      width: channels of the stem and the first stage (64 for ResNet-18).
      dtype: None (float32) or ``jnp.bfloat16`` (``model.compute_dtype``): bfloat16 compute
        with float32 parameters and BatchNorm statistics; logits are returned in float32.
    """

    num_classes: int
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    width: int = 64
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ValueError(f"ResNet expects images [B, H, W(, C)]; got shape {x.shape}")
        stem = nn.Conv(
            self.width, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype, name="stem_conv"
        )
        bn = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, dtype=self.dtype, name="stem_bn"
        )
        h_BxHxWxC = relu(bn, bn(stem(x)))
        for s, size in enumerate(self.stage_sizes, start=1):
            for b in range(size):
                block = BasicBlock(
                    self.width * 2 ** (s - 1),
                    strides=2 if s > 1 and b == 0 else 1,
                    dtype=self.dtype,
                    name=f"stage{s}_block{b}",
                )
                h_BxHxWxC = block(h_BxHxWxC, train)
        h_BxC = h_BxHxWxC.mean(axis=(1, 2))
        logits_BxK = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(h_BxC)
        return logits_BxK.astype(jnp.float32)
