"""Built-in models: ``create_model(config.model, num_classes)`` -> a Flax linen module.

Families: ``mlp``, ``cnn``, ``transformer`` (encoder classifier, ReLU FFN), ``resnet``
(CIFAR-style ResNet-18 with BatchNorm), ``gpt`` (causal decoder language model, ReLU FFN);
every one takes ``model.compute_dtype`` ("float32" | "bfloat16", :func:`compute_dtype`).

The names live in :data:`regime_jax.registry.MODELS`; ``register_model(name, factory)`` adds a
user's ``factory(cfg, num_classes) -> module`` under a new ``model.name``.

Every model routes each ReLU through the explicit site :func:`regime_jax.models.record.relu`;
training reads them through :func:`regime_jax.capture_relus` like any user's model, and the
site gives the same layers and bits (tested).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from regime_jax import registry
from regime_jax.models.cnn import CNN
from regime_jax.models.gpt import GPT
from regime_jax.models.mlp import MLP
from regime_jax.models.record import (
    PREACTS,
    SIGN_ACTIVATIONS,
    check_activation,
    flatten_layers,
    patterns_of,
    preacts_of,
    relu,
    site_preacts_fn,
)
from regime_jax.models.resnet import ResNet
from regime_jax.models.transformer import Transformer


def _positive_ints(value: Any, field: str) -> tuple[int, ...]:
    widths = tuple(int(w) for w in value)
    if not widths or any(w <= 0 for w in widths):
        raise ValueError(f"{field} must be a non-empty list of positive ints, got {value!r}")
    return widths


_REQUIRED = object()


def _get(cfg: Mapping[str, Any], field: str, default: Any) -> Any:
    value = cfg.get(field, default)
    if value is _REQUIRED:
        raise ValueError(f"model.{field} is required")
    return value


def _positive(cfg: Mapping[str, Any], field: str, default: Any = _REQUIRED) -> int:
    value = _get(cfg, field, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"model.{field} must be a positive int, got {value!r}")
    return int(value)


def _choice(cfg: Mapping[str, Any], field: str, allowed: tuple, default: Any = _REQUIRED) -> Any:
    value = _get(cfg, field, default)
    if value not in allowed:
        raise ValueError(f"model.{field}={value!r} is unknown; allowed values: {sorted(allowed)}")
    return value


# model.compute_dtype: the dtype every built-in model computes in; parameters (and BatchNorm
# statistics) stay float32 and logits are float32 either way. "float32" builds exactly the
# module it always did (dtype None); a config without the field is float32.
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def compute_dtype(cfg: Mapping[str, Any]) -> Any:
    """``model.compute_dtype`` ("float32" | "bfloat16") as a module ``dtype`` (None: float32)."""
    return COMPUTE_DTYPES[_choice(cfg, "compute_dtype", tuple(COMPUTE_DTYPES), "float32")]


def build_mlp(cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    check_activation(cfg.get("activation", "relu"), "model.activation")
    return MLP(
        hidden=_positive_ints(cfg["hidden"], "model.hidden"),
        num_classes=num_classes,
        dtype=compute_dtype(cfg),
    )


def build_cnn(cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    check_activation(cfg.get("activation", "relu"), "model.activation")
    dense = tuple(cfg.get("dense", (128,)))  # may be empty: head right after the convs
    return CNN(
        dims=_choice(cfg, "dims", (1, 2)),
        channels=_positive_ints(_get(cfg, "channels", _REQUIRED), "model.channels"),
        num_classes=num_classes,
        kernel_size=_positive(cfg, "kernel_size", 3),
        strides=_positive(cfg, "strides", 1),
        pool=_choice(cfg, "pool", ("avg", "max", "none"), "max"),
        pool_size=_positive(cfg, "pool_size", 2),
        dense=_positive_ints(dense, "model.dense") if dense else (),
        norm=_choice(cfg, "norm", ("layer", "none"), "none"),
        dtype=compute_dtype(cfg),
    )


def _heads(cfg: Mapping[str, Any]) -> tuple[int, int]:
    dim, num_heads = _positive(cfg, "dim"), _positive(cfg, "num_heads")
    if dim % num_heads:
        raise ValueError(f"model.dim={dim} must be divisible by model.num_heads={num_heads}")
    return dim, num_heads


def build_transformer(cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    check_activation(cfg.get("activation", "relu"), "model.activation", SIGN_ACTIVATIONS)
    dim, num_heads = _heads(cfg)
    return Transformer(
        num_layers=_positive(cfg, "num_layers"),
        num_heads=num_heads,
        dim=dim,
        mlp_dim=_positive(cfg, "mlp_dim"),
        num_classes=num_classes,
        embed=_choice(cfg, "embed", ("patch", "scalar")),
        patch_size=_positive(cfg, "patch_size", 4),
        positions=_choice(cfg, "positions", ("learned", "sinusoidal"), "learned"),
        pool=_choice(cfg, "pool", ("cls", "mean"), "mean"),
        activation=cfg.get("activation", "relu"),
        dtype=compute_dtype(cfg),
    )


def build_resnet(cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    """``model.name="resnet"``: stage_sizes (default ResNet-18's), width, compute_dtype."""
    check_activation(cfg.get("activation", "relu"), "model.activation")
    return ResNet(
        num_classes=num_classes,
        stage_sizes=_positive_ints(cfg.get("stage_sizes", (2, 2, 2, 2)), "model.stage_sizes"),
        width=_positive(cfg, "width", 64),
        dtype=compute_dtype(cfg),
    )


def build_gpt(cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    """``model.name="gpt"``: the vocabulary is the dataset's ``num_classes``."""
    check_activation(cfg.get("activation", "relu"), "model.activation")
    dim, num_heads = _heads(cfg)
    tie = _get(cfg, "tie_embeddings", True)
    if not isinstance(tie, bool):
        raise ValueError(f"model.tie_embeddings={tie!r} must be True or False")
    return GPT(
        vocab_size=num_classes,
        num_layers=_positive(cfg, "num_layers"),
        num_heads=num_heads,
        dim=dim,
        mlp_dim=_positive(cfg, "mlp_dim"),
        context=_positive(cfg, "context"),
        tie_embeddings=tie,
        dtype=compute_dtype(cfg),
    )


MODELS = registry.MODELS
register_model = MODELS.register


def create_model(cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    """Builds the model named ``cfg["name"]``; unknown names raise naming the allowed ones."""
    return MODELS.get(cfg.get("name"))(cfg, num_classes)


__all__ = [
    "CNN",
    "GPT",
    "MLP",
    "MODELS",
    "PREACTS",
    "ResNet",
    "Transformer",
    "check_activation",
    "create_model",
    "flatten_layers",
    "patterns_of",
    "preacts_of",
    "register_model",
    "relu",
    "site_preacts_fn",
]
