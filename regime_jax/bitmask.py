"""Packed activation bitmasks: 1 bit per unit, units on the last axis.

Layout: a boolean pattern ``[P, positions..., U]`` packs along the unit axis with
``bitorder="little"`` into uint8 ``[P, positions..., ceil(U / 8)]``; unit ``u`` is bit
``u % 8`` of byte ``u // 8``. The unit count ``U`` travels with the masks (records store it)
so :func:`unpack` is exact. Padding bits (the ``8 * ceil(U/8) - U`` high bits of the last
byte) never count: :func:`flip_count` and friends mask them out even if a caller's bytes have
them set. Works on jax and numpy arrays alike (jnp functions, jit-able).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class Packed:
    """One layer's packed patterns; ``units`` is static pytree metadata (safe under jit).

    Attributes:
      bits: uint8 ``[P, positions..., ceil(units / 8)]``.
      units: number of units on the unpacked last axis.
    """

    bits: jax.Array
    units: int = struct.field(pytree_node=False)

    @classmethod
    def from_bool(cls, pattern: jax.Array) -> Packed:
        """Packs a boolean ``[P, positions..., U]`` pattern."""
        return cls(pack(pattern), pattern.shape[-1])

    def unpack(self) -> jax.Array:
        return unpack(self.bits, self.units)

    @property
    def num_bits(self) -> int:
        return num_bits(self.bits.shape, self.units)


# The packed patterns of every recorded layer of a model, keyed by layer name: the one type
# the step, the monitor, the analyzer and the records pass around.
Patterns = Mapping[str, Packed]


def active(z: jax.Array) -> jax.Array:
    """A unit's bit: ``z > 0`` for its pre-activation ``z``; exact zero is *off*.

    The one definition of a bit, shared by the training step, the monitor, the analyzer and
    the stability test.

    >>> active(jnp.array([-1.0, 0.0, 2.0])).tolist()
    [False, False, True]
    """
    return jnp.greater(z, 0)


def num_bytes(units: int) -> int:
    """Bytes per packed row of ``units`` bits."""
    return (units + 7) // 8


def pack(bits: jax.Array) -> jax.Array:
    """Packs a boolean ``[..., U]`` array into uint8 ``[..., ceil(U/8)]`` (little bit order).

    >>> pack(jnp.array([True, False, True])).tolist()
    [5]
    """
    return jnp.packbits(jnp.asarray(bits, jnp.bool_), axis=-1, bitorder="little")


def unpack(packed: jax.Array, units: int) -> jax.Array:
    """Inverse of :func:`pack`: uint8 ``[..., ceil(U/8)]`` -> boolean ``[..., U]``."""
    if packed.shape[-1] != num_bytes(units):
        raise ValueError(
            f"packed last axis has {packed.shape[-1]} bytes; units={units} needs {num_bytes(units)}"
        )
    bits = jnp.unpackbits(packed, axis=-1, count=units, bitorder="little")
    return bits.astype(jnp.bool_)


def valid_bits(units: int) -> np.ndarray:
    """uint8 ``[ceil(U/8)]`` with a 1 at every real (non-padding) bit."""
    out = np.full(num_bytes(units), 0xFF, np.uint8)
    if units % 8:
        out[-1] = (1 << (units % 8)) - 1
    return out


def popcount(packed: jax.Array, units: int) -> jax.Array:
    """Number of set (real) bits over the whole array, as int32."""
    masked = jnp.bitwise_and(packed, valid_bits(units))
    return jnp.sum(jax.lax.population_count(masked).astype(jnp.int32))


def flip_count(a: jax.Array, b: jax.Array, units: int) -> jax.Array:
    """Hamming distance between two packed masks: popcount(a XOR b), padding excluded."""
    return popcount(jnp.bitwise_xor(a, b), units)


def flip_rate(a: jax.Array, b: jax.Array, units: int) -> jax.Array:
    """Flip count divided by the number of real bits (examples x positions x units)."""
    return flip_count(a, b, units) / num_bits(a.shape, units)


def num_bits(packed_shape: tuple[int, ...], units: int) -> int:
    """Real bits in a packed array of this shape: prod(leading axes) x units."""
    return int(np.prod(packed_shape[:-1], dtype=np.int64)) * units


def always_on(packed_PxSxY: jax.Array, units: int) -> jax.Array:
    """Count of (position, unit) sites on for every example (axis 0), as int32.

    The reduction over examples runs on unpacked 0/1 bytes with ``min`` (not a bitwise AND of
    the packed bytes): across devices that is an all-reduce every backend supports.
    """
    on = jnp.min(unpack(packed_PxSxY, units).astype(jnp.uint8), axis=0)
    return jnp.sum(on, dtype=jnp.int32)


def dead(packed_PxSxY: jax.Array, units: int) -> jax.Array:
    """Count of (position, unit) sites off for every example (axis 0), as int32."""
    any_on = jnp.max(unpack(packed_PxSxY, units).astype(jnp.uint8), axis=0)
    sites = num_bits(packed_PxSxY.shape[1:], units)
    return sites - jnp.sum(any_on, dtype=jnp.int32)
