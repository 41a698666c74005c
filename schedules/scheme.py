"""The integer arithmetic of 8-bit quantization, in numpy: the one definition every pass, kernel and test uses.

real = scale * (q - zero_point).  Activations: per-tensor, asymmetric, with the range nudged so that real 0.0
is exactly representable (the zero point is an integer; gemmlowp/TF round the *min* onto the grid, then derive
the max).  Weights: symmetric int8 in [-127, 127] (zero point 0), per output channel or per tensor.

Requantization (int32 accumulator -> narrower integer) uses an int32 fixed-point multiplier M in [2^30, 2^31)
and a total right shift s >= 1:  out = (acc * M + 2^(s-1)) >> s, where acc * M is a 32x32->64 widening
multiply (vpmuldq / smull), and the rounding is half towards +inf, as in TFLite's single-rounding
MultiplyByQuantizedMultiplier.  No other step leaves 32 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DTYPE_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}
WEIGHT_RANGE = (-127, 127)  # symmetric: -128 unused, so -w is always representable (TFLite spec)
_MAX_SHIFT = 62  # beyond this every int32 product rounds to 0 anyway


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of one quantized tensor; arrays when per-channel (along ``axis``)."""

    scale: np.ndarray  # float32, shape () or (C,)
    zero_point: np.ndarray  # int32, same shape as scale
    dtype: str  # "uint8" | "int8"
    axis: int | None = None  # channel axis of per-channel parameters

    @property
    def qmin(self) -> int:
        return DTYPE_RANGES[self.dtype][0]

    @property
    def qmax(self) -> int:
        return DTYPE_RANGES[self.dtype][1]

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim > 0


def activation_qparams(lo: float, hi: float, dtype: str = "uint8") -> QParams:
    """Per-tensor asymmetric parameters covering [lo, hi], nudged so that 0.0 is a grid point.

    The range is first widened to include 0 (ReLU outputs, zero padding).  The zero point is the rounded
    position of ``lo`` on the grid, so the representable range may shift by at most half a step.
    """
    qmin, qmax = DTYPE_RANGES[dtype]
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = np.float32((hi - lo) / (qmax - qmin))  # checked after the cast: a tiny range underflows to 0
    if not np.isfinite(scale) or scale <= 0.0:
        scale = np.float32(1.0)  # constant-zero tensor: any scale represents it exactly
    zero_point = int(np.clip(np.round(qmin - lo / float(scale)), qmin, qmax))
    return QParams(np.asarray(scale, np.float32), np.asarray(zero_point, np.int32), dtype)


def weight_qparams(weight: np.ndarray, axis: int | None = 0) -> QParams:
    """Symmetric int8 parameters: scale = max|w| / 127 per slice along ``axis`` (per tensor when None)."""
    w = np.asarray(weight, np.float32)
    if axis is None:
        amax = np.asarray(np.abs(w).max(initial=0.0))
    else:
        amax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1, initial=0.0)
    scale = (amax / WEIGHT_RANGE[1]).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0))  # all zero, or so tiny the step underflows: every w -> 0
    return QParams(scale, np.zeros(scale.shape, np.int32), "int8", axis)


BIAS_LIMIT = 2 ** 30  # |bias / (s_x * s_w)| in the int32 accumulator, leaving 2^30 for the dot product


def fit_bias(qp: QParams, bias: np.ndarray, input_scale: float) -> QParams:
    """Weight parameters whose accumulator scale s_x * s_w holds the bias in int32: where a channel's bias is
    more than BIAS_LIMIT accumulator steps, its weight scale grows to |bias| / (s_x * BIAS_LIMIT).

    Such a channel's inputs are tiny against its bias (a head fed by near-zero activations, a pruned channel):
    the coarser weights lose only what the bias dwarfs, where an overflowed bias is wrong (ONNX Runtime's
    quantizer adjusts weight scales the same way)."""
    bias = np.abs(np.asarray(bias, np.float64).reshape(-1))
    needed = bias / (float(input_scale) * BIAS_LIMIT)
    if not qp.per_channel:
        needed = needed.max(initial=0.0)
    scale = np.maximum(qp.scale.astype(np.float64), needed).astype(np.float32)
    return QParams(scale, qp.zero_point, qp.dtype, qp.axis)


def _broadcast(values: np.ndarray, qp: QParams, ndim: int) -> np.ndarray:
    if not qp.per_channel:
        return values
    shape = [1] * ndim
    shape[qp.axis] = -1
    return values.reshape(shape)


def quantize(x: np.ndarray, qp: QParams, qrange: tuple[int, int] | None = None) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point)."""
    x = np.asarray(x, np.float32)
    qmin, qmax = qrange or (qp.qmin, qp.qmax)
    scale = _broadcast(qp.scale, qp, x.ndim)
    zero_point = _broadcast(qp.zero_point, qp, x.ndim)
    q = np.rint(x / scale) + zero_point
    return np.clip(q, qmin, qmax).astype(qp.dtype)


def quantize_weight(weight: np.ndarray, qp: QParams) -> np.ndarray:
    """Weights saturate to [-127, 127], keeping the int8 grid symmetric."""
    return quantize(weight, qp, WEIGHT_RANGE)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """ONNX DequantizeLinear: (q - zero_point) * scale, in float32."""
    scale = _broadcast(qp.scale, qp, np.ndim(q))
    zero_point = _broadcast(qp.zero_point, qp, np.ndim(q))
    return ((np.asarray(q, np.int32) - zero_point) * scale).astype(np.float32)


def fixed_point_multiplier(real) -> tuple[np.ndarray, np.ndarray]:
    """int32 multiplier M in [2^30, 2^31) and total right shift s with real ~= M * 2^-s (elementwise).

    real must be positive and below 2^30.  Tiny multipliers saturate at shift 62 (the product rounds to 0).
    """
    real = np.asarray(real, np.float64)
    if np.any(real <= 0) or np.any(real >= 2.0**30):
        raise ValueError(f"requantization multiplier out of range: {real}")
    mantissa, exponent = np.frexp(real)  # real = mantissa * 2^exponent, mantissa in [0.5, 1)
    multiplier = np.round(mantissa * 2.0**31).astype(np.int64)
    overflow = multiplier == 2**31
    multiplier = np.where(overflow, multiplier // 2, multiplier)
    shift = 31 - (exponent + overflow)
    if np.any(shift < 1):  # real within rounding of 2^30: M = 2^30 would need shift 0
        raise ValueError(f"requantization multiplier out of range: {real}")
    too_small = shift > _MAX_SHIFT
    multiplier = np.where(too_small, multiplier >> np.minimum(shift - _MAX_SHIFT, 31), multiplier)
    shift = np.minimum(shift, _MAX_SHIFT)
    return multiplier.astype(np.int32), shift.astype(np.int32)


def add_multipliers(scale_a: float, scale_b: float, scale_out: float) -> tuple[int, int, int]:
    """(Ma, Mb, s) with Ma / 2^s ~= scale_a / scale_out and Mb / 2^s ~= scale_b / scale_out: one shift, so a
    quantized add sums both operands exactly in int64 and rounds once.

    The shift is the larger operand's (its 31-bit multiplier kept exact); the other multiplier is aligned to it
    (exact when shifted left; a tiny operand's multiplier loses low bits).  |8-bit q| * M < 2^9 * 2^53 fits int64.
    """
    (ma, sa), (mb, sb) = (fixed_point_multiplier(x / scale_out) for x in (scale_a, scale_b))
    shift = int(min(max(sa, sb), min(sa, sb) + 22))

    def aligned(m, s):
        m, s = int(m), int(s)
        return m << (shift - s) if shift >= s else (m + (1 << (s - shift - 1))) >> (s - shift)

    return aligned(ma, sa), aligned(mb, sb), shift


def requantize(acc: np.ndarray, multiplier: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """round(acc * M / 2^s), ties towards +inf, as int32.  M and s broadcast against acc (channels last)."""
    acc64 = np.asarray(acc, np.int64)
    shift64 = np.asarray(shift, np.int64)
    out = (acc64 * np.asarray(multiplier, np.int64) + (np.int64(1) << (shift64 - 1))) >> shift64
    return out.astype(np.int32)


HIGH_WORD_SHIFTS = (33, _MAX_SHIFT)  # the shifts requantize_high_word computes exactly


def uses_high_word(shift) -> bool:
    """Whether every shift lets the kernels requantize with the high word of the product (requantize_high_word):
    true for all but layers whose output scale is within ~3x of their accumulator scale."""
    shift = np.asarray(shift)
    return bool(np.all((shift >= HIGH_WORD_SHIFTS[0]) & (shift <= HIGH_WORD_SHIFTS[1])))


def requantize_high_word(acc: np.ndarray, multiplier: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """requantize for 33 <= s <= 62 in 32-bit steps: ((acc * M) >> 32 + 2^(s-33)) >> (s-32).

    Equal to requantize: with P = acc * M = H * 2^32 + L (0 <= L < 2^32), P + 2^(s-1) = (H + 2^(s-33)) * 2^32 + L,
    so its floor shift by s is (H + 2^(s-33)) >> (s-32); |H| < 2^30 and 2^(s-33) <= 2^29, so the sum fits in int32.
    H is the "multiply high" of two int32 and the rest is int32 arithmetic, so the kernels keep the 64-bit lanes to
    that one product (schedules.qkernels._requantize_high_word): a 1x1 int8 conv with 16 input channels runs 1.4x
    faster.
    """
    high = ((np.asarray(acc, np.int64) * np.asarray(multiplier, np.int64)) >> 32).astype(np.int32)
    shift = np.asarray(shift, np.int32)
    return (high + (np.int32(1) << (shift - 33))) >> (shift - 32)


def saturate(values: np.ndarray, dtype: str, lo: int | None = None, hi: int | None = None) -> np.ndarray:
    """Clamp to [lo, hi] (default: the dtype's range) and cast: the last step of every integer op."""
    qmin, qmax = DTYPE_RANGES[dtype]
    lo = qmin if lo is None else max(lo, qmin)
    hi = qmax if hi is None else min(hi, qmax)
    return np.clip(values, lo, hi).astype(dtype)


def activation_clamp(qp: QParams, lo: float | None, hi: float | None) -> tuple[int, int]:
    """Integer clamp bounds of a fused ReLU/Clip(lo, hi) on an output with parameters qp."""
    qlo = qp.qmin if lo is None else max(qp.qmin, int(np.round(lo / float(qp.scale))) + int(qp.zero_point))
    qhi = qp.qmax if hi is None else min(qp.qmax, int(np.round(hi / float(qp.scale))) + int(qp.zero_point))
    return qlo, qhi
