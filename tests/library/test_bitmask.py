"""Packing, unpacking and Hamming distances of activation bitmasks."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from regime_jax import bitmask

settings.register_profile("bitmask", max_examples=20, deadline=None)
settings.load_profile("bitmask")

LEADS = st.sampled_from([(1,), (3,), (2, 3)])  # few shapes: every new shape is a compile


UNITS = st.integers(1, 37)


def bool_arrays(units=UNITS):
    return st.tuples(LEADS, units).flatmap(lambda s: hnp.arrays(np.bool_, (*s[0], s[1])))


@given(bool_arrays())
def test_round_trip_any_unit_count(bits):
    packed = bitmask.pack(bits)
    assert packed.dtype == jnp.uint8
    assert packed.shape == (*bits.shape[:-1], (bits.shape[-1] + 7) // 8)
    np.testing.assert_array_equal(bitmask.unpack(packed, bits.shape[-1]), bits)


def test_little_bit_order_layout():
    bits = np.zeros(11, bool)
    bits[[0, 2, 9]] = True
    np.testing.assert_array_equal(bitmask.pack(bits), [0b101, 0b10])


@given(st.data())
def test_flip_count_matches_numpy_and_is_a_metric(data):
    a = data.draw(bool_arrays())
    b = data.draw(hnp.arrays(np.bool_, a.shape))
    c = data.draw(hnp.arrays(np.bool_, a.shape))
    u = a.shape[-1]
    pa, pb, pc = bitmask.pack(a), bitmask.pack(b), bitmask.pack(c)
    d_ab = int(bitmask.flip_count(pa, pb, u))
    assert d_ab == np.count_nonzero(a != b)
    assert d_ab == int(bitmask.flip_count(pb, pa, u))
    assert (int(bitmask.flip_count(pa, pa, u)) == 0) and ((d_ab == 0) == np.array_equal(a, b))
    assert d_ab <= int(bitmask.flip_count(pa, pc, u)) + int(bitmask.flip_count(pc, pb, u))


@given(bool_arrays(units=st.integers(1, 37).filter(lambda u: u % 8)), st.integers(1, 255))
def test_padding_bits_never_count(bits, junk):
    u = bits.shape[-1]
    packed = np.asarray(bitmask.pack(bits))
    dirty = packed.copy()
    pad = np.uint8(~bitmask.valid_bits(u)[-1] & junk)
    dirty[..., -1] |= pad
    assert int(bitmask.flip_count(packed, dirty, u)) == 0
    assert int(bitmask.popcount(dirty, u)) == np.count_nonzero(bits)
    np.testing.assert_array_equal(bitmask.unpack(dirty, u), bits)


@given(bool_arrays())
def test_dead_and_always_on_counts(bits):
    packed = bitmask.pack(bits)
    u = bits.shape[-1]
    assert int(bitmask.dead(packed, u)) == np.count_nonzero(~bits.any(0))
    assert int(bitmask.always_on(packed, u)) == np.count_nonzero(bits.all(0))


def test_packed_unpack_and_units_are_static():
    bits = np.random.default_rng(0).random((4, 13)) > 0.5
    p = bitmask.Packed.from_bool(bits)
    assert p.units == 13 and p.num_bits == 52
    np.testing.assert_array_equal(p.unpack(), bits)


def test_unpack_rejects_wrong_unit_count():
    try:
        bitmask.unpack(bitmask.pack(np.ones(9, bool)), 17)
    except ValueError as err:
        assert "units=17" in str(err)
    else:
        raise AssertionError("expected ValueError")


@given(bool_arrays(), st.integers(0, 255))
def test_rates_are_the_python_quotient_of_exact_counts(bits, junk):
    """Counts with junk in the padding bits equal numpy's; each rate is np.float32(c / n)."""
    u = bits.shape[-1]
    packed = np.array(bitmask.pack(bits))  # a writable copy
    if u % 8:
        packed[..., -1] |= np.uint8((0xFF << u % 8) & 0xFF & junk)
    flipped = np.asarray(bitmask.pack(~bits))
    n, sites = bits.size, bits[0].size
    count = int(bitmask.flip_count(packed, flipped, u))
    assert count == n  # every real bit differs; no padding bit counts
    assert int(bitmask.popcount(packed, u)) == np.count_nonzero(bits)
    rate = np.float32(bitmask.flip_rate(packed, np.asarray(bitmask.pack(bits & False)), u))
    assert rate == np.float32(np.count_nonzero(bits) / n)
    dead = int(bitmask.dead(packed, u))
    assert dead == np.count_nonzero(~bits.any(0)) and 0 <= dead <= sites
    got = np.float32(bitmask.rate(np.int32(dead), sites))
    assert got.view(np.uint32) == np.float32(dead / sites).view(np.uint32)


def test_count_forms_and_count_int():
    small = bitmask.count_sum(np.ones((3, 5), np.uint8), 1, 15)
    assert small.dtype == jnp.int32 and small.shape == ()
    big = bitmask.count_sum(np.ones((3, 5), np.uint8), 1, 2**31)  # the bound picks the form
    assert big.dtype == jnp.uint32 and big.shape == (2,)
    assert bitmask.count_int(small) == bitmask.count_int(big) == 15
    assert bitmask.count_int(np.array([2, 3], np.uint32)) == 2 * 2**32 + 3
