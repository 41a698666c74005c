"""Bit packing: storage format and bit planes round-trip, and their bit layout is the documented one."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schedules import bitpack


def test_two_bit_storage_layout():
    codes = np.array([[1, 2, 3, 0, 3]], np.uint8)
    packed = bitpack.pack_codes(codes, 2)
    assert packed.tolist() == [[1 | 2 << 2 | 3 << 4 | 0 << 6, 3]]
    np.testing.assert_array_equal(bitpack.unpack_codes(packed, 2, 5), codes)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), rows=st.integers(1, 5), length=st.integers(1, 37),
       seed=st.integers(0, 2**16))
def test_storage_round_trip_odd_lengths(bits, rows, length, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, (rows, length)).astype(np.uint8)
    packed = bitpack.pack_codes(codes, bits)
    assert packed.shape == (rows, -(-length * bits // 8))
    np.testing.assert_array_equal(bitpack.unpack_codes(packed, bits, length), codes)


def test_two_bit_weights_take_a_sixteenth_of_fp32():
    codes = np.random.default_rng(0).integers(0, 4, (64, 3 * 3 * 32)).astype(np.uint8)
    assert bitpack.pack_codes(codes, 2).nbytes * 16 == codes.size * 4


def test_bitplane_layout():
    codes = np.array([3, 1, 2, 0, 1] + [0] * 30 + [2], np.uint8)  # 36 codes -> 2 uint32 words
    planes = bitpack.bitplanes(codes, 2, axis=0, word="uint32")
    assert planes.shape == (2, 2) and planes.dtype == np.uint32
    assert int(planes[0, 0]) == 0b10011 and int(planes[1, 0]) == 0b00101
    assert int(planes[0, 1]) == 0 and int(planes[1, 1]) == 1 << 3  # code 35 -> word 1, bit 3


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 4), word=st.sampled_from(["uint8", "uint32", "uint64"]),
       shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), data=st.data())
def test_bitplanes_round_trip_any_axis(bits, word, shape, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    length = data.draw(st.integers(1, 70))
    shape[axis] = length
    codes = rng.integers(0, 2**bits, shape).astype(np.uint8)
    planes = bitpack.bitplanes(codes, bits, axis=axis, word=word)
    a = axis % codes.ndim
    assert planes.shape == codes.shape[:a] + (bits, bitpack.num_words(length, word)) + codes.shape[a + 1:]
    np.testing.assert_array_equal(bitpack.unpack_bitplanes(planes, bits, length, axis=a), codes)


def test_popcount_dot_product_of_planes_is_the_integer_dot_product():
    rng = np.random.default_rng(1)
    a, w = rng.integers(0, 4, 100), rng.integers(0, 4, 100)
    pa, pw = bitpack.bitplanes(a, 2, 0, "uint64"), bitpack.bitplanes(w, 2, 0, "uint64")
    popcount = lambda v: sum(bin(int(x)).count("1") for x in v)  # noqa: E731
    dot = sum(2 ** (i + j) * popcount(pa[i] & pw[j]) for i in range(2) for j in range(2))
    assert dot == int(a @ w)


def test_bad_input():
    with pytest.raises(ValueError):
        bitpack.pack_codes(np.array([4]), 2)
    with pytest.raises(ValueError):
        bitpack.pack_codes(np.array([1]), 3)
    with pytest.raises(ValueError):
        bitpack.bitplanes(np.array([1.0]), 2)
    with pytest.raises(ValueError):
        bitpack.unpack_codes(np.zeros(2, np.uint8), 2, 9)
