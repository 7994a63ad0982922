"""GPT-style causal decoder with a ReLU FFN, for next-token prediction on token sequences.

Tokens ``[B, T]`` (integers in ``[0, vocab_size)``) -> embedding + learned position
embedding -> ``num_layers`` pre-LN blocks (causal self-attention, then the ReLU FFN; the
encoder :class:`regime_jax.models.transformer.Block` with a causal mask) -> final LayerNorm
-> logits ``[B, T, vocab_size]`` for the token that follows each position, through the
transposed token embedding (``tie_embeddings``) or a separate ``head``. Deterministic (no
dropout).

Patterns are recorded in the FFN hidden units at every token position, as in the encoder:
block ``i`` records ``z`` of shape ``[B, T, mlp_dim]`` under ``block{i}/ffn/fc1``. Position
``t``'s pattern depends on tokens ``0..t`` only (the causal mask; tested).

The loss of the built-in loop (:func:`regime_jax.run.step.cross_entropy`) is then the
per-token cross-entropy, each sequence's mean over its positions, and ``eval/acc`` the token
accuracy (the fraction of next tokens predicted by the argmax).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from regime_jax.models.transformer import Block


class GPT(nn.Module):
    """Causal decoder language model.

    Attributes:
      vocab_size: token ids in ``[0, vocab_size)``; the logits' last axis.
      num_layers: blocks ``block0`` .. ``block{num_layers-1}``.
      num_heads: attention heads (``dim % num_heads == 0``).
      dim: token width.
      mlp_dim: FFN hidden width (the recorded units).
      context: the longest sequence (rows of the learned ``pos_embedding``); inputs may be
        shorter, never longer.
      tie_embeddings: logits from the token embedding's transpose (True) or a Dense ``head``.
      dtype: None (float32) or ``jnp.bfloat16`` (``model.compute_dtype``): bfloat16 compute
        with float32 parameters; logits are returned in float32.
    """

    vocab_size: int
    num_layers: int
    num_heads: int
    dim: int
    mlp_dim: int
    context: int
    tie_embeddings: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        if tokens_BxT.ndim != 2 or not jnp.issubdtype(tokens_BxT.dtype, jnp.integer):
            raise ValueError(
                f"GPT expects integer tokens [B, T]; got {tokens_BxT.dtype} {tokens_BxT.shape}"
            )
        num_tokens = tokens_BxT.shape[1]
        if num_tokens > self.context:
            raise ValueError(
                f"sequences of {num_tokens} tokens are longer than model.context={self.context}"
            )
        init = nn.initializers.normal(stddev=0.02)
        embed = nn.Embed(
            self.vocab_size, self.dim, embedding_init=init, dtype=self.dtype, name="embed"
        )
        pos_CxD = self.param("pos_embedding", init, (self.context, self.dim))
        x_BxTxD = embed(tokens_BxT) + pos_CxD[:num_tokens]
        mask_Bx1xTxT = nn.make_causal_mask(tokens_BxT)
        for i in range(self.num_layers):
            block = Block(self.num_heads, self.dim, self.mlp_dim, self.dtype, name=f"block{i}")
            x_BxTxD = block(x_BxTxD, mask_Bx1xTxT)
        x_BxTxD = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x_BxTxD)
        if self.tie_embeddings:
            logits_BxTxV = embed.attend(x_BxTxD)
        else:
            logits_BxTxV = nn.Dense(self.vocab_size, dtype=self.dtype, name="head")(x_BxTxD)
        return logits_BxTxV.astype(jnp.float32)
