"""Pre-LayerNorm encoder Transformer for classification of images or scalar sequences.

Patterns are recorded only in the FFN hidden units, at every token position: block ``i``
records ``z`` of shape ``[B, T, mlp_dim]`` under the key ``block{i}/ffn/fc1`` (the path of
the Dense that produces ``z``, as :func:`regime_jax.capture_relus` names it). With
``pool="cls"`` the token axis ``T`` includes the CLS token (at index 0). Attention, layer
norms, embedding and head have no ReLU and record nothing.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from regime_jax.models.record import SIGN_ACTIVATIONS, activate, check_activation

# A module's ``dtype``: None computes in the parameters' dtype (float32); ``jnp.bfloat16``
# computes in bfloat16 with float32 parameters (mixed precision, ``model.compute_dtype``).
Dtype = Any

EMBEDS = ("patch", "scalar")
POSITIONS = ("learned", "sinusoidal")
POOLS = ("cls", "mean")


def sinusoidal_positions(num_tokens: int, dim: int) -> np.ndarray:
    """Fixed ``[num_tokens, dim]`` sin/cos table (Vaswani et al., 2017)."""
    pos_Tx1 = np.arange(num_tokens, dtype=np.float32)[:, None]
    inv_freq = np.exp(-np.log(10_000.0) * np.arange(0, dim, 2, dtype=np.float32) / dim)
    table_TxD = np.zeros((num_tokens, dim), np.float32)
    table_TxD[:, 0::2] = np.sin(pos_Tx1 * inv_freq)
    table_TxD[:, 1::2] = np.cos(pos_Tx1 * inv_freq)[:, : dim // 2]
    return table_TxD


class FFN(nn.Module):
    """``fc1`` -> recorded ReLU (site: ``fc1``, e.g. ``block0/ffn/fc1``; a GELU / SiLU:
    ``block0/ffn/fc1:gelu``) -> ``fc2``."""

    mlp_dim: int
    dim: int
    dtype: Dtype = None
    activation: str = "relu"

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        fc1 = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")
        h_BxTxF = activate(fc1, fc1(x_BxTxD), self.activation)
        return nn.Dense(self.dim, dtype=self.dtype, name="fc2")(h_BxTxF)


class Block(nn.Module):
    """Pre-LN block: ``x + MHA(LN(x))``, then ``x + FFN(LN(x))``; ``mask``: attention mask
    ``[B, 1, T, T]`` (None: every token attends to every token; the GPT passes a causal one)."""

    num_heads: int
    dim: int
    mlp_dim: int
    dtype: Dtype = None
    activation: str = "relu"  # the FFN's

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        y_BxTxD = nn.LayerNorm(dtype=self.dtype, name="ln1")(x_BxTxD)
        attn = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            qkv_features=self.dim,
            out_features=self.dim,
            dtype=self.dtype,
            name="attn",
        )
        x_BxTxD = x_BxTxD + attn(y_BxTxD, y_BxTxD, mask=mask)
        y_BxTxD = nn.LayerNorm(dtype=self.dtype, name="ln2")(x_BxTxD)
        return x_BxTxD + FFN(self.mlp_dim, self.dim, self.dtype, self.activation, name="ffn")(
            y_BxTxD
        )


class Transformer(nn.Module):
    """Encoder Transformer classifier; deterministic (no dropout).

    Attributes:
      num_layers: encoder blocks ``block0`` .. ``block{num_layers-1}``.
      num_heads: attention heads (``dim % num_heads == 0``).
      dim: token width.
      mlp_dim: FFN hidden width (the recorded units).
      num_classes: output logits.
      embed: "patch" (images ``[B, H, W(, C)]`` -> non-overlapping ``patch_size`` patches by a
        strided Conv ``embed``) or "scalar" (sequences ``[B, L(, 1)]`` -> one token per scalar
        by a Dense ``embed``).
      patch_size: patch side for ``embed="patch"``; H and W must be multiples of it.
      positions: "learned" (param ``pos_embedding``) or "sinusoidal" (fixed).
      pool: "mean" over tokens or "cls" (a learned ``cls`` token prepended, read out).
      activation: the FFN's: "relu", or "gelu" (flax's default, the tanh form) / "silu",
        recorded only where the run opts in (``record.activations``; capture's
        ``activations=``), keyed ``block0/ffn/fc1:gelu``.
      dtype: None (float32) or ``jnp.bfloat16``: the computation's dtype (``model.compute_dtype``;
        parameters stay float32, logits are returned in float32, the recorded
        pre-activations are the bfloat16 ones the FFN computes).
    """

    num_layers: int
    num_heads: int
    dim: int
    mlp_dim: int
    num_classes: int
    embed: str
    patch_size: int = 4
    positions: str = "learned"
    pool: str = "mean"
    activation: str = "relu"
    dtype: Dtype = None

    def __post_init__(self):
        check_activation(self.activation, "model.activation", SIGN_ACTIVATIONS)
        super().__post_init__()

    def _tokens(self, x: jax.Array) -> jax.Array:
        """Embeds the input into ``[B, T, dim]`` tokens."""
        if self.embed == "scalar":
            if x.ndim == 2:
                x = x[..., None]
            if x.ndim != 3 or x.shape[-1] != 1:
                raise ValueError(f"embed='scalar' expects [B, L] or [B, L, 1]; got {x.shape}")
            return nn.Dense(self.dim, dtype=self.dtype, name="embed")(x)
        if self.embed == "patch":
            if x.ndim == 3:
                x = x[..., None]
            if x.ndim != 4 or x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
                raise ValueError(
                    f"embed='patch' expects [B, H, W(, C)] with H, W multiples of "
                    f"model.patch_size={self.patch_size}; got {x.shape}"
                )
            patch = (self.patch_size, self.patch_size)
            x = nn.Conv(
                self.dim, patch, strides=patch, padding="VALID", dtype=self.dtype, name="embed"
            )(x)
            return x.reshape(x.shape[0], -1, self.dim)
        raise ValueError(f"model.embed={self.embed!r} is unknown; allowed values: {list(EMBEDS)}")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x_BxTxD = self._tokens(x)
        if self.pool == "cls":
            cls_1x1xD = self.param("cls", nn.initializers.zeros, (1, 1, self.dim))
            cls_Bx1xD = jnp.broadcast_to(cls_1x1xD, (x_BxTxD.shape[0], 1, self.dim))
            x_BxTxD = jnp.concatenate([cls_Bx1xD, x_BxTxD], axis=1)
        elif self.pool != "mean":
            raise ValueError(f"model.pool={self.pool!r} is unknown; allowed values: {list(POOLS)}")
        num_tokens = x_BxTxD.shape[1]
        if self.positions == "learned":
            init = nn.initializers.normal(stddev=0.02)
            x_BxTxD = x_BxTxD + self.param("pos_embedding", init, (1, num_tokens, self.dim))
        elif self.positions == "sinusoidal":
            x_BxTxD = x_BxTxD + jnp.asarray(sinusoidal_positions(num_tokens, self.dim))
        else:
            raise ValueError(
                f"model.positions={self.positions!r} is unknown; allowed values: {list(POSITIONS)}"
            )
        for i in range(self.num_layers):
            block = Block(
                self.num_heads,
                self.dim,
                self.mlp_dim,
                self.dtype,
                self.activation,
                name=f"block{i}",
            )
            x_BxTxD = block(x_BxTxD)
        x_BxTxD = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x_BxTxD)
        h_BxD = x_BxTxD[:, 0] if self.pool == "cls" else x_BxTxD.mean(axis=1)
        logits_BxK = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(h_BxD)
        return logits_BxK if self.dtype is None else logits_BxK.astype(jnp.float32)
