"""Gate freezing: ReLU on/off decided by frozen gate parameters, values trained (issue 15).

The causal test of the regime change hypothesis (PAPER.md, claim 4): copy the parameters at
step F as *gates*, freeze them, and train a second copy, the *values*, through a network whose
every ReLU unit is switched by the gate network on the same input::

    h_values = z_values * [z_gates > 0],    h_gates = max(z_gates, 0)

(:func:`regime_jax.capture.gate_relus`; names and the bit ``z > 0`` as in
:func:`regime_jax.capture_relus`). If the patterns have settled by F, training the values
under frozen gates should reach the accuracy of ordinary training. With ``gates == values``
(F = the current step) the gated network *is* the network, bit for bit.

:func:`gated_net` turns a model (a :class:`regime_jax.Net`, a linen or NNX module, or a
plain ``apply_fn(params, x)``) into ``GatedNet(apply, preacts_fn)``;
:func:`disagreement` measures how far the values' own patterns ``z_values > 0`` have drifted
from the frozen gates ``z_gates > 0``, per layer and over all bits. Everything is pure and
jit-able; nothing here reads or writes files.

>>> import jax.numpy as jnp
>>> apply_fn = lambda p, x: jnp.maximum(x @ p, 0.0).sum(-1)
>>> net = gated_net(apply_fn)
>>> values, gates, x = jnp.array([[1.0, -1.0]]), jnp.array([[1.0, 1.0]]), jnp.ones((3, 1))
>>> net.apply(values, gates, x).tolist()  # unit 1: gate on, value -1 passes
[0.0, 0.0, 0.0]
>>> {k: float(v) for k, v in disagreement_metrics(*net.preacts_fn(values, gates, x)[1:]).items()}
{'decouple/disagree/relu_0': 0.5, 'decouple/disagree/all': 0.5}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from regime_jax import analyzer, bitmask
from regime_jax.bitmask import Packed, Patterns
from regime_jax.capture import GatedFn, MaskedFn, capture_relus, gate_relus, mask_relus
from regime_jax.models import adapt

PREFIX = "decouple/disagree"


class GatedNet(NamedTuple):
    """A model's gated transform (see :func:`gated_net`).

    Attributes:
      apply: ``apply(values, gates, x) -> out``, the value network's output.
      preacts_fn: ``preacts_fn(values, gates, x) -> (out, {layer: z_values}, {layer:
        z_gates})``.
    """

    apply: Callable[[Any, Any, Any], Any]
    preacts_fn: GatedFn


def gated_net(model: Any, activations: tuple[str, ...] = ("relu",)) -> GatedNet:
    """The gated transform of a model, as the functions a training step needs.

    Args:
      model: a :class:`regime_jax.Net`, a linen module (params are its ``"params"``
        collection), an initialized NNX module (params are its ``nnx.Param`` state), or any
        ``apply_fn(params, x)``.
      activations: the functions gated, as :func:`regime_jax.capture.gate_relus` takes them
        (opted-in GELU / SiLU: ``z_values * g(z_gates)``).

    Returns:
      ``GatedNet(apply, preacts_fn)``: with ``gates`` the frozen parameters and ``values``
      the trained ones (same tree). ``apply(values, values, x)`` equals the model's forward
      bit for bit; ``jax.grad`` of ``apply`` reaches ``values`` only.

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> model, x = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)]), jnp.ones((3, 5))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> out = gated_net(model).apply(params, params, x)
    >>> bool((out == model.apply({"params": params}, x)).all())
    True
    """
    apply_fn = adapt.as_net(model).apply if adapt.is_model(model) else model
    preacts_fn = gate_relus(apply_fn, tuple(activations))

    def apply(values: Any, gates: Any, x: Any) -> Any:
        return preacts_fn(values, gates, x)[0]

    return GatedNet(apply, preacts_fn)


class MaskedNet(NamedTuple):
    """A model under stored gate masks (see :func:`masked_net`).

    Attributes:
      apply: ``apply(values, bits, x) -> out``: the value network with every ReLU unit
        switched by ``bits`` (``{layer: Packed [B, positions..., ceil(units / 8)]}``, the
        gates' packed patterns on the same ``B`` examples); no gate forward runs.
      preacts_fn: ``preacts_fn(values, bits, x) -> (out, {layer: z_values})``.
      gate_bits: ``gate_bits(gates, x) -> {layer: Packed}``: the gate network's packed
        ``z > 0`` on ``x`` (every layer, unsampled), what ``bits`` holds.
    """

    apply: Callable[[Any, Patterns, Any], Any]
    preacts_fn: MaskedFn
    gate_bits: Callable[[Any, Any], dict[str, Packed]]


def masked_net(model: Any) -> MaskedNet:
    """The gated transform with the gates' patterns given, as the functions a step needs.

    Once the gates are frozen a training example's pattern is fixed: its packed bits can be
    computed once (``gate_bits``) and the values trained through ``apply`` alone
    (:func:`regime_jax.capture.mask_relus`), the same maths as :func:`gated_net` without the
    gate forward: ``masked_net(m).apply(values, gate_bits(gates, x), x)`` equals
    ``gated_net(m).apply(values, gates, x)``.

    Args:
      model: as for :func:`gated_net`.

    Raises:
      CaptureError: (at the first call) as :func:`regime_jax.capture.mask_relus` (a ReLU
        inside a scan).

    >>> import jax.numpy as jnp
    >>> apply_fn = lambda p, x: jnp.maximum(x @ p, 0.0).sum(-1)
    >>> values, gates, x = jnp.array([[1.0, -1.0]]), jnp.array([[1.0, 1.0]]), jnp.ones((3, 1))
    >>> net = masked_net(apply_fn)
    >>> net.apply(values, net.gate_bits(gates, x), x).tolist()
    [0.0, 0.0, 0.0]
    """
    apply_fn = adapt.as_net(model).apply if adapt.is_model(model) else model
    masked, captured = mask_relus(apply_fn), capture_relus(apply_fn)

    def preacts_fn(values: Any, bits: Patterns, x: Any):
        return masked(values, {k: p.unpack() for k, p in bits.items()}, x)

    def apply(values: Any, bits: Patterns, x: Any) -> Any:
        return preacts_fn(values, bits, x)[0]

    def gate_bits(gates: Any, x: Any) -> dict[str, Packed]:
        return analyzer.patterns_from_preacts(captured(gates, x)[1])

    return MaskedNet(apply, preacts_fn, gate_bits)


def gate_bits_per_example(model: Any, params: Any, x_example: Any) -> int:
    """Bytes of the packed gate bits of one example (every layer), from shapes alone:
    ``sum over layers of positions x ceil(units / 8)``; a cache of ``N`` examples takes ``N``
    times this."""
    apply_fn = adapt.as_net(model).apply if adapt.is_model(model) else model
    z = jax.eval_shape(lambda p, e: capture_relus(apply_fn)(p, e)[1], params, x_example)
    return sum(
        int(np.prod(a.shape[1:-1], dtype=np.int64)) * bitmask.num_bytes(a.shape[-1])
        for a in z.values()
    )


def disagreement(
    z_values: Mapping[str, jax.Array], z_gates: Mapping[str, jax.Array]
) -> dict[str, jax.Array]:
    """Fraction of bits on which the values' own pattern differs from the frozen gates.

    Args:
      z_values: ``{layer: z}`` of the value network, ``[P, positions..., units]`` (float).
      z_gates: ``{layer: z}`` of the gate network, same layers and shapes.

    Returns:
      ``{layer: rate, "all": rate}``: ``popcount((z_v > 0) XOR (z_g > 0)) / (P x positions x
      units)`` per layer, and over every bit of every layer (bits-weighted), as float32
      scalars. Bits are :func:`regime_jax.bitmask.active` (exact zero is off), packed and
      counted like :func:`regime_jax.analyzer.flip_rates` (integer counts summed before the
      division, so a sharded probe reduces exactly). 0 when gates == values.

    Raises:
      ValueError: no layer, a layer with no bit (an empty probe set), different layers, or
        different shapes in the two dicts.

    >>> import jax.numpy as jnp
    >>> rates = disagreement({"fc1": jnp.array([[1.0, -1.0]])}, {"fc1": jnp.array([[1.0, 1.0]])})
    >>> {k: float(v) for k, v in rates.items()}
    {'fc1': 0.5, 'all': 0.5}
    """
    if set(z_values) != set(z_gates):
        raise ValueError(
            f"z_values has layers {sorted(z_values)} but z_gates has {sorted(z_gates)}: pass "
            f"both pre-activation dicts of one gated forward"
        )
    for name, z in z_values.items():
        if z.shape != z_gates[name].shape:
            raise ValueError(
                f"layer {name!r}: z_values has shape {z.shape} but z_gates {z_gates[name].shape}"
            )
    gates = analyzer.patterns_from_preacts(z_gates)
    return analyzer.flip_rates(gates, analyzer.patterns_from_preacts(z_values))


def disagreement_of_patterns(
    values: Mapping[str, Packed], gates: Mapping[str, Packed]
) -> dict[str, jax.Array]:
    """:func:`disagreement_metrics` of packed patterns (``analyzer.patterns_from_preacts``).

    What a training step records after the freeze: the value stream's patterns on the probe
    set against the gates' (stored once, at the freeze).
    """
    if set(values) != set(gates):
        raise ValueError(f"values have layers {sorted(values)} but gates have {sorted(gates)}")
    return _metrics(analyzer.flip_rates(gates, values))


def _metrics(rates: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {f"{PREFIX}/{k}": v for k, v in rates.items()}


def disagreement_metrics(
    z_values: Mapping[str, jax.Array], z_gates: Mapping[str, jax.Array]
) -> dict[str, jax.Array]:
    """:func:`disagreement` as metrics: ``decouple/disagree/<layer>``, ``decouple/disagree/all``."""
    return _metrics(disagreement(z_values, z_gates))
