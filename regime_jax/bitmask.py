"""Packed activation bitmasks: 1 bit per unit, units on the last axis.

Layout: a boolean pattern ``[P, positions..., U]`` packs along the unit axis with
``bitorder="little"`` into uint8 ``[P, positions..., ceil(U / 8)]``; unit ``u`` is bit
``u % 8`` of byte ``u // 8``. The unit count ``U`` travels with the masks (records store it)
so :func:`unpack` is exact. Padding bits (the ``8 * ceil(U/8) - U`` high bits of the last
byte) never count: :func:`flip_count` and friends mask them out even if a caller's bytes have
them set. Works on jax and numpy arrays alike (jnp functions, jit-able).

Counts are exact for any number of bits and rates are exact quotients. A *Count* is an int32
scalar when the most it can be (the bits counted, static from shapes) is below 2^31, so it
cannot overflow; else a uint32 ``[2]`` array ``(hi, lo)`` = ``hi * 2^32 + lo``, summed with
carries (:func:`sum64`) and exact below 2^64. :func:`count_int` makes either form a Python
int on the host. :func:`rate` is ``np.float32(count / bits)`` bit for bit, computed in
integers (no float32 division, which XLA rewrites into a multiplication by a rounded
reciprocal), under jit and on every backend; below 2^29 bits that is also the float32
nearest the exact quotient.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax


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
    """Number of set (real) bits over the whole array, exact (a Count: :func:`count_sum`)."""
    masked = jnp.bitwise_and(packed, valid_bits(units))
    ones = jax.lax.population_count(masked)  # uint8, 0..8 per byte
    return count_sum(ones, 8, num_bits(packed.shape, units))


def flip_count(a: jax.Array, b: jax.Array, units: int) -> jax.Array:
    """Hamming distance between two packed masks: popcount(a XOR b), padding excluded.

    Masks over :data:`BLOCK_BYTES` are counted a block of examples at a time
    (:func:`_example_blocks`), so the temporary memory is one block's, not the masks' four
    times over (XLA on CPU widens the bytes to int32 before summing them).
    """
    rows = _block_rows(a.shape)
    if rows >= a.shape[0]:
        return popcount(jnp.bitwise_xor(a, b), units)
    xa, xb = _example_blocks(a, rows, copies=False), _example_blocks(b, rows, copies=False)
    block = lambda j: popcount(jnp.bitwise_xor(_block(xa, j), _block(xb, j)), units)
    partial = lax.map(block, jnp.arange(xa.shape[1]))  # int32 [n]: a block has < 2^31 bits
    each = num_bits(xa.shape[:1] + xa.shape[2:], units)
    return count_sum(partial, each, num_bits(a.shape, units))


# Packed bytes of masks counted in one pass; larger masks are counted in blocks of examples
# of at most this many bytes (temporary memory ~ 8x this, whatever the masks' size).
BLOCK_BYTES = 2**22


def _block_rows(shape: tuple[int, ...]) -> int:
    """Examples per block: as many as keep a block within :data:`BLOCK_BYTES` (at least 1)."""
    return max(1, BLOCK_BYTES // max(int(np.prod(shape[1:], dtype=np.int64)), 1))


def _example_blocks(x: jax.Array, rows: int, *, copies: bool) -> jax.Array:
    """``x [P, ...]`` as ``[r, n, ...]`` blocks ``x[:, j]`` of ``r <= rows`` strided examples
    (example ``i * n + j``; a leading-axis sharding stays on axis 0). ``P`` not a multiple of
    ``r``: the ``r * n - P`` padding rows are zeros (``copies=False``: they add nothing to a
    popcount of a XOR) or copies of the first examples (``copies=True``: min / max unchanged)."""
    num = x.shape[0]
    n = -(-num // rows)
    rows = -(-num // n)
    pad = rows * n - num
    if pad:
        fill = x[:pad] if copies else jnp.zeros((pad, *x.shape[1:]), x.dtype)
        x = jnp.concatenate([x, fill])
    return x.reshape(rows, n, *x.shape[1:])


def _block(xs: jax.Array, j: jax.Array) -> jax.Array:
    return lax.dynamic_index_in_dim(xs, j, 1, keepdims=False)


def flip_rate(a: jax.Array, b: jax.Array, units: int) -> jax.Array:
    """Flip count divided by the number of real bits (examples x positions x units), as
    ``np.float32(count / bits)`` exactly (:func:`rate`)."""
    return rate(flip_count(a, b, units), num_bits(a.shape, units))


def num_bits(packed_shape: tuple[int, ...], units: int) -> int:
    """Real bits in a packed array of this shape: prod(leading axes) x units."""
    return int(np.prod(packed_shape[:-1], dtype=np.int64)) * units


def _reduce_examples(packed_PxSxY: jax.Array, units: int, reduce: Any) -> jax.Array:
    """``reduce(unpack(packed), axis=0)`` as uint8 0/1 ``[S..., U]``, one bit plane at a time.

    ``reduce`` (``jnp.min`` or ``jnp.max``) runs on 0/1 bytes (not a bitwise AND / OR of the
    packed bytes): across devices that is an all-reduce every backend supports. Each plane
    ``(packed >> b) & 1`` is reduced as it is read (one fusion), so no unpacked
    ``[P, S..., U]`` array is ever held: the memory is that of the result.
    """
    rows = _block_rows(packed_PxSxY.shape)
    if rows < packed_PxSxY.shape[0]:  # large masks: a block of examples at a time
        xs = _example_blocks(packed_PxSxY, rows, copies=True)
        step = lambda j, acc: _combine(reduce, acc, _reduce_examples(_block(xs, j), units, reduce))
        first = _reduce_examples(_block(xs, 0), units, reduce)
        return lax.fori_loop(1, xs.shape[1], step, first)
    planes = [reduce((packed_PxSxY >> np.uint8(b)) & np.uint8(1), axis=0) for b in range(8)]
    per_unit = jnp.stack(planes, axis=-1)  # [S..., Y, 8]: unit 8 * byte + bit (little order)
    return per_unit.reshape(*per_unit.shape[:-2], -1)[..., :units].astype(jnp.uint8)


def _combine(reduce: Any, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.minimum(a, b) if reduce is jnp.min else jnp.maximum(a, b)


def always_on(packed_PxSxY: jax.Array, units: int) -> jax.Array:
    """Count of (position, unit) sites on for every example (axis 0), exact (a Count)."""
    on = _reduce_examples(packed_PxSxY, units, jnp.min)
    return count_sum(on, 1, num_bits(packed_PxSxY.shape[1:], units))


def dead(packed_PxSxY: jax.Array, units: int) -> jax.Array:
    """Count of (position, unit) sites off for every example (axis 0), exact (a Count)."""
    off = 1 - _reduce_examples(packed_PxSxY, units, jnp.max)
    return count_sum(off, 1, num_bits(packed_PxSxY.shape[1:], units))


# ------------------------------------------------------------------ exact counts and rates
#
# A Count is an exact number of bits. Device-side JAX runs without x64 here (int32 at most),
# so its form is chosen statically from the most it can be (the number of bits counted,
# known from shapes): an int32 scalar when that bound is below 2^31, which no count can then
# overflow; else a uint32 ``[2]`` array ``(hi, lo)`` holding ``hi * 2^32 + lo``, exact below
# 2^64. :func:`count_int` turns a fetched Count of either form into a Python int.

LIMB_BOUND = 2**31  # a Count whose bound reaches this is two uint32 limbs
_U32 = jnp.uint32


def count_sum(x: jax.Array, each: int, bound: int) -> jax.Array:
    """The exact sum of an array of non-negative integers, each at most ``each``, as a Count.

    ``bound`` (static) is the most the sum can be; it picks the form (int32 below 2^31, else
    ``(hi, lo)`` limbs). Limbs: int32 partial sums over trailing axes small enough that none
    can reach 2^31 (``prod(trailing) * each < 2^31``), then :func:`sum64` of those partial
    sums. Integer sums are exact in any order, so sharding cannot change the result.

    >>> int(count_sum(jnp.ones((3, 4), jnp.uint8), 1, 12))
    12
    """
    x = jnp.asarray(x)
    if bound < LIMB_BOUND:
        return jnp.sum(x, dtype=jnp.int32)
    shape = x.shape
    keep = len(shape)  # sum axes keep.. in int32; the rest in limbs
    while keep > 0 and int(np.prod(shape[keep - 1 :], dtype=object)) * each < LIMB_BOUND:
        keep -= 1
    if keep == len(shape):  # the last axis alone could overflow: cut it into blocks
        x = x.reshape(-1)
        block = max(1, LIMB_BOUND // max(each, 1) // 2)
        head = x.size // block * block
        parts = [jnp.sum(x[:head].reshape(-1, block), axis=1, dtype=jnp.int32)]
        if head < x.size:
            parts.append(jnp.sum(x[head:], dtype=jnp.int32)[None])
        partial = jnp.concatenate(parts)
    else:
        partial = jnp.sum(x, axis=tuple(range(keep, len(shape))), dtype=jnp.int32)
    return sum64(partial)


def sum64(x: jax.Array) -> jax.Array:
    """Exact sum of non-negative integers (each below 2^32) as uint32 ``[2]`` ``(hi, lo)``.

    One variadic ``lax.reduce`` over pairs ``(hi, lo)``: ``lo = lo_a + lo_b mod 2^32``, a carry
    when that wrapped (``lo < lo_a``), ``hi = hi_a + hi_b + carry``: addition modulo 2^64,
    associative and commutative, so XLA may reduce in any order or across devices.

    >>> [int(v) for v in sum64(jnp.array([2**32 - 1, 2**32 - 1, 5], jnp.uint32))]
    [2, 3]
    """
    lo = jnp.asarray(x).astype(_U32)
    zero = np.uint32(0)
    hi, lo = jax.lax.reduce(
        (jnp.zeros_like(lo), lo), (zero, zero), _add_limbs, tuple(range(lo.ndim))
    )
    return jnp.stack([hi, lo])


def _add_limbs(a, b):
    (hi_a, lo_a), (hi_b, lo_b) = a, b
    lo = lo_a + lo_b
    return hi_a + hi_b + (lo < lo_a).astype(_U32), lo


def limbs(count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(hi, lo)`` uint32 of a Count of either form (an int32 count has ``hi = 0``)."""
    count = jnp.asarray(count)
    if count.dtype == _U32 and count.shape[-1:] == (2,):
        return count[..., 0], count[..., 1]
    return jnp.zeros(count.shape, _U32), count.astype(_U32)


def add_counts(counts: list[jax.Array], bound: int) -> jax.Array:
    """The exact sum of Counts (either form) as a Count for ``bound`` (static); elementwise
    over stacks of counts of one shape (limbs on the last axis)."""
    if bound < LIMB_BOUND:
        return sum(jnp.asarray(c, jnp.int32) for c in counts)
    pairs = [limbs(c) for c in counts]
    hi, lo = pairs[0]
    for pair in pairs[1:]:
        hi, lo = _add_limbs((hi, lo), pair)
    return jnp.stack([hi, lo], axis=-1)


def count_int(count: Any) -> int:
    """A fetched Count (numpy / jax, int32 scalar or uint32 ``(hi, lo)``) as a Python int.

    >>> count_int(np.array([1, 5], np.uint32)), count_int(np.int32(7))
    (4294967301, 7)
    """
    value = np.asarray(count)
    if value.shape == (2,) and value.dtype == np.uint32:
        return int(value[0]) << 32 | int(value[1])
    return int(value)


# Below this many bits a float64 quotient rounded to float32 is the exactly rounded quotient
# (double rounding is innocuous): a quotient c / b with b < 2^29 that is not a float32
# midpoint lies at least 2^-24 / b > 2^-53 (relative) from one, farther than float64 rounds.
SINGLE_ROUNDING_BELOW = 2**29


def rate(count: Any, bits: Any) -> jax.Array:
    """``np.float32(count / bits)`` as Python computes it, bit for bit, on every backend.

    Args:
      count: a Count, or a stack of them (int32 ``[n]`` or uint32 ``[n, 2]``).
      bits: the static denominators (Python ints, ``1 <= bits < 2^63``, ``count <= bits``):
        an int, or a sequence matching the stack.

    Returns:
      float32 of the count's shape: Python's ``count / bits`` (the float64 nearest the exact
      quotient) rounded to float32. With ``bits < 2^29`` that is the float32 nearest the exact
      quotient; above, it can differ from that by 1 ulp when the quotient lies within 2^-53 of
      a float32 midpoint, and the rate follows Python.

    A float32 division would not do: XLA rewrites a division by a constant into a
    multiplication by its rounded reciprocal (1 ulp off for 29% of quotients by random
    divisors below 2^24 on CPU, measured with jax 0.10), TPUs divide approximately, and an
    integer above 2^24 does not convert to float32 exactly. So the quotient is rounded in
    integers: ``count`` is normalized so that ``b <= count * 2^e < 2b`` (``e`` from the bit
    lengths); long division gives the mantissa's bits and a round bit, the remainder the sticky
    bit, ties go to even, and the float32's bits are assembled directly (``((126 - e) << 23)
    + mantissa``). When every ``bits < 2^29``: uint32 only, several quotient bits per exact
    integer division (3 divisions below 2^24 bits); else restoring division on 64-bit
    ``(hi, lo)`` uint32 limbs, 53 bits (float64's rounding) rounded again to 24 (float32's).
    Elementwise and unrolled (no loop), over a whole stack of counts at once.

    >>> float(rate(jnp.int32(1), 3)) == float(np.float32(1 / 3))
    True
    """
    b = np.asarray(bits, dtype=object)
    if np.any(b < 1) or np.any(b >= 2**63):
        raise ValueError(f"bits must lie in [1, 2^63): {bits}")
    c_hi, c_lo = limbs(count)
    return _rate(c_hi, c_lo, tuple(int(v) for v in b.ravel()), b.shape)


@functools.partial(jax.jit, static_argnums=(2, 3))  # one executable when called eagerly
def _rate(c_hi: jax.Array, c_lo: jax.Array, bits: tuple[int, ...], shape: tuple[int, ...]):
    b = np.array(bits, dtype=object).reshape(shape)
    if max(bits) < SINGLE_ROUNDING_BELOW:
        return _rate32(c_lo, b.astype(np.uint32))
    b_hi = jnp.asarray(np.vectorize(lambda v: v >> 32, otypes=[np.uint32])(b))
    b_lo = jnp.asarray(np.vectorize(lambda v: v & 0xFFFFFFFF, otypes=[np.uint32])(b))
    return _rate64(c_hi, c_lo, b_hi, b_lo)


def _rate32(c: jax.Array, b: np.ndarray) -> jax.Array:
    """:func:`rate` for ``b < 2^29`` (then ``c <= b`` is its low limb): 32-bit integers only,
    ``k`` quotient bits per exact integer division, ``k`` the largest divisor of 24 with
    ``b * 2^k < 2^32`` (3 divisions for ``b < 2^24``, 8 at most)."""
    k = max(d for d in (1, 2, 3, 4, 6, 8, 12, 24) if int(b.max()) << d < 2**32)
    b = jnp.asarray(b)
    zero = c == 0
    c = jnp.where(zero, np.uint32(1), c)  # any value: the result is 0 there
    e = jax.lax.clz(c).astype(jnp.int32) - jax.lax.clz(b).astype(jnp.int32)
    a = c << e.astype(_U32)  # as many bits as b: b / 2 < a < 2b
    low = a < b
    a, e = jnp.where(low, a << 1, a), e + low.astype(jnp.int32)  # b <= a < 2b < 2^30
    r, m = a - b, jnp.ones_like(c)  # the leading quotient bit is 1
    for _ in range(24 // k):  # 23 mantissa bits, then the round bit
        t = r << k
        q = t // b
        r, m = t - q * b, (m << k) | q
    half, m = (m & 1) == 1, m >> 1
    m = m + (half & ((r != 0) | ((m & 1) == 1))).astype(_U32)  # to nearest, ties to even
    out = ((126 - e).astype(_U32) << 23) + m  # a carry out of the mantissa bumps e
    return jnp.where(zero, np.float32(0), jax.lax.bitcast_convert_type(out, jnp.float32))


def _rate64(c_hi, c_lo, b_hi, b_lo) -> jax.Array:
    """:func:`rate` on 64-bit ``(hi, lo)`` limbs, one quotient bit per step: float64's 53-bit
    mantissa first, then float32's 24 (Python's double rounding)."""
    zero = (c_hi == 0) & (c_lo == 0)
    c_lo = jnp.where(zero, np.uint32(1), c_lo)  # any value: the result is 0 there
    e = _bit_length(b_hi, b_lo) - _bit_length(c_hi, c_lo)  # b <= c * 2^(e or e + 1) < 2b
    a_hi, a_lo = _shift_left(c_hi, c_lo, e)
    low = _less(a_hi, a_lo, b_hi, b_lo)
    e = e + low.astype(jnp.int32)
    a_hi, a_lo = _shift_left(a_hi, a_lo, low.astype(jnp.int32))
    r_hi, r_lo = _sub(a_hi, a_lo, b_hi, b_lo)  # the leading quotient bit is 1
    m_hi, m_lo = jnp.zeros_like(c_lo), jnp.ones_like(c_lo)
    for _ in range(53):  # 52 more mantissa bits, then the round bit
        r_hi, r_lo = (r_hi << 1) | (r_lo >> 31), r_lo << 1
        bit = ~_less(r_hi, r_lo, b_hi, b_lo)
        s_hi, s_lo = _sub(r_hi, r_lo, b_hi, b_lo)
        r_hi, r_lo = jnp.where(bit, s_hi, r_hi), jnp.where(bit, s_lo, r_lo)
        m_hi, m_lo = (m_hi << 1) | (m_lo >> 31), (m_lo << 1) | bit.astype(_U32)
    half = (m_lo & 1) == 1
    m_hi, m_lo = m_hi >> 1, (m_lo >> 1) | (m_hi << 31)
    up = (half & (((r_hi | r_lo) != 0) | ((m_lo & 1) == 1))).astype(_U32)  # ties to even
    m_hi, m_lo = m_hi + (m_lo + up < m_lo).astype(_U32), m_lo + up
    # that float64 (53-bit mantissa, now in m) rounded to float32's 24 bits
    half = ((m_lo >> 28) & 1) == 1
    sticky = (m_lo & np.uint32(2**28 - 1)) != 0
    m_lo = (m_hi << 3) | (m_lo >> 29)
    m_lo = m_lo + (half & (sticky | ((m_lo & 1) == 1))).astype(_U32)
    out = ((126 - e).astype(_U32) << 23) + m_lo  # a carry out of the mantissa bumps e
    return jnp.where(zero, np.float32(0), jax.lax.bitcast_convert_type(out, jnp.float32))


def _bit_length(hi: jax.Array, lo: jax.Array) -> jax.Array:
    return jnp.where(
        hi != 0, 64 - jax.lax.clz(hi).astype(jnp.int32), 32 - jax.lax.clz(lo).astype(jnp.int32)
    )


def _shift_left(hi: jax.Array, lo: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(hi, lo) << s`` for ``0 <= s < 64`` (the result must fit); shift amounts are kept
    inside ``[0, 31]``, so no backend's out-of-range shift semantics are relied on."""
    s = jnp.asarray(s, jnp.int32)
    small = jnp.clip(s, 0, 31).astype(_U32)
    spill = jnp.where(s == 0, np.uint32(0), lo >> jnp.clip(32 - s, 1, 31).astype(_U32))
    big = jnp.clip(s - 32, 0, 31).astype(_U32)
    return (
        jnp.where(s >= 32, lo << big, (hi << small) | spill),
        jnp.where(s >= 32, np.uint32(0), lo << small),
    )


def _less(a_hi, a_lo, b_hi, b_lo) -> jax.Array:
    return (a_hi < b_hi) | ((a_hi == b_hi) & (a_lo < b_lo))


def _sub(a_hi, a_lo, b_hi, b_lo) -> tuple[jax.Array, jax.Array]:
    """``a - b`` for ``a >= b``."""
    return a_hi - b_hi - (a_lo < b_lo).astype(_U32), a_lo - b_lo
