"""Bit packing of low-bit codes, in numpy: the storage format and the bit-plane format of the kernels.

* Storage (:func:`pack_codes`): ``8 // bits`` codes per byte along the last axis, code i of a byte in bits
  ``[i * bits, (i + 1) * bits)`` (little-endian); 2-bit codes pack 4 per byte, so a 2-bit weight costs 1/16 of
  its fp32 bytes (plus the padding of the last byte of each row).
* Bit planes (:func:`bitplanes`): a ``bits``-bit code tensor becomes ``bits`` binary tensors, each packed into
  unsigned words along one axis (the reduction axis of a kernel): bit ``j`` of word ``w`` of plane ``p`` is bit
  ``p`` of the code at index ``w * word_bits + j``.  Padding bits are 0, so they add nothing to an AND+popcount.
"""

from __future__ import annotations

import numpy as np

WORDS = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64}


def _check_codes(codes, bits: int) -> np.ndarray:
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits: [{codes.min()}, {codes.max()}]")
    return codes


def pack_codes(codes, bits: int = 2) -> np.ndarray:
    """Pack codes in 0..2^bits-1 along the last axis, 8 // bits per byte (bits in 1, 2, 4, 8): uint8."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"storage packing needs bits in (1, 2, 4, 8), got {bits}")
    codes = _check_codes(codes, bits).astype(np.uint8)
    per_byte = 8 // bits
    length = codes.shape[-1]
    pad = (-length) % per_byte
    codes = np.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    groups = codes.reshape(codes.shape[:-1] + (-1, per_byte))
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(groups << shifts, axis=-1).astype(np.uint8)


def unpack_codes(packed, bits: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the first ``length`` codes of each row, uint8."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"storage packing needs bits in (1, 2, 4, 8), got {bits}")
    packed = np.asarray(packed, np.uint8)
    per_byte = 8 // bits
    if packed.shape[-1] * per_byte < length:
        raise ValueError(f"{packed.shape[-1]} bytes hold at most {packed.shape[-1] * per_byte} codes, not {length}")
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8(2**bits - 1)
    return codes.reshape(packed.shape[:-1] + (-1,))[..., :length]


def word_bits(word: str) -> int:
    if word not in WORDS:
        raise ValueError(f"unknown word type {word!r}; expected one of {sorted(WORDS)}")
    return np.dtype(WORDS[word]).itemsize * 8


def num_words(length: int, word: str) -> int:
    return -(-int(length) // word_bits(word))


def bitplanes(codes, bits: int, axis: int = -1, word: str = "uint32") -> np.ndarray:
    """Bit planes of ``codes`` packed into ``word``s along ``axis``.

    Shape: ``codes.shape`` with ``axis`` (length L) replaced by ``(bits, ceil(L / word_bits))``.
    """
    nbits = word_bits(word)
    dtype = WORDS[word]
    codes = _check_codes(codes, bits)
    axis = axis % codes.ndim
    moved = np.moveaxis(codes, axis, -1).astype(np.uint64)
    length = moved.shape[-1]
    moved = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, (-length) % nbits)])
    moved = moved.reshape(moved.shape[:-1] + (-1, nbits))  # [..., words, word_bits]
    weights = np.uint64(1) << np.arange(nbits, dtype=np.uint64)
    planes = [(((moved >> np.uint64(p)) & np.uint64(1)) * weights).sum(axis=-1, dtype=np.uint64)
              for p in range(bits)]
    stacked = np.stack(planes, axis=-2).astype(dtype)  # [..., bits, words]
    return np.moveaxis(stacked, (-2, -1), (axis, axis + 1))


def unpack_bitplanes(planes, bits: int, length: int, axis: int = -1) -> np.ndarray:
    """Inverse of :func:`bitplanes`: ``axis`` names the plane axis (followed by the word axis); uint8 codes."""
    planes = np.asarray(planes)
    nbits = planes.dtype.itemsize * 8
    axis = axis % (planes.ndim - 1)
    if planes.shape[axis] != bits:
        raise ValueError(f"axis {axis} has {planes.shape[axis]} planes, expected {bits}")
    moved = np.moveaxis(planes, (axis, axis + 1), (-2, -1)).astype(np.uint64)  # [..., bits, words]
    shifts = np.arange(nbits, dtype=np.uint64)
    bits_ = (moved[..., None] >> shifts) & np.uint64(1)  # [..., bits, words, word_bits]
    flat = bits_.reshape(bits_.shape[:-2] + (-1,))[..., :length]  # [..., bits, L]
    codes = sum(flat[..., p, :] << np.uint64(p) for p in range(bits)).astype(np.uint8)
    return np.moveaxis(codes, -1, axis)
