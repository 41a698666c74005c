"""numpy int64 versions of schedules/qkernels.py, written from the formulas of schedules/scheme.py: the
oracles the kernels are tested against (exact equality)."""

import numpy as np

from schedules import scheme
from schedules.qkernels import QSHIFT
from schedules.qkernels import _out_size as out_size  # the output-size formula the kernels share


def pad_nhwc(x, padding, value):
    top, left, bottom, right = padding
    return np.pad(x, [(0, 0), (top, bottom), (left, right), (0, 0)], constant_values=value)


def windows(x, kh, kw, strides, dilation, oh, ow):
    """[N, OH, OW, KH, KW, C] view of the windows of a padded NHWC array."""
    (sh, sw), (dh, dw) = strides, dilation
    rows = [[x[:, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw, :]
             for j in range(kw)] for i in range(kh)]
    return np.stack([np.stack(r, axis=3) for r in rows], axis=3)


def qconv2d(data, weight, bias, multiplier, shift, *, strides, padding, dilation, groups,
            input_zero_point, output_zero_point, out_min, out_max, out_dtype, high_word=False):
    """numpy int64 version of qconv2d, straight from the formula (which ``high_word`` does not change)."""
    del high_word
    kh, kw, group_channels, out_channels = weight.shape
    padded = pad_nhwc(np.asarray(data, np.int64), padding, input_zero_point)
    oh = out_size(data.shape[1], kh, strides[0], dilation[0], padding[0], padding[2])
    ow = out_size(data.shape[2], kw, strides[1], dilation[1], padding[1], padding[3])
    taps = windows(padded, kh, kw, strides, dilation, oh, ow)  # N, OH, OW, KH, KW, C
    per_group = out_channels // groups
    acc = np.zeros(taps.shape[:3] + (out_channels,), np.int64)
    for g in range(groups):
        x = taps[..., g * group_channels:(g + 1) * group_channels]
        w = np.asarray(weight[..., g * per_group:(g + 1) * per_group], np.int64)
        acc[..., g * per_group:(g + 1) * per_group] = np.tensordot(x, w, axes=([3, 4, 5], [0, 1, 2]))
    acc += np.asarray(bias, np.int64)
    out = scheme.requantize(acc, multiplier, shift).astype(np.int64) + output_zero_point
    return scheme.saturate(out, out_dtype, out_min, out_max)


def qdense(data, weight, bias, multiplier, shift, *, input_zero_point, output_zero_point, out_min,
           out_max, out_dtype, high_word=False):
    """numpy int64 version of qdense (``high_word`` does not change the result)."""
    del input_zero_point, high_word
    acc = np.asarray(data, np.int64) @ np.asarray(weight, np.int64) + np.asarray(bias, np.int64)
    out = scheme.requantize(acc, multiplier, shift).astype(np.int64) + output_zero_point
    return scheme.saturate(out, out_dtype, out_min, out_max)


def qadd(a, b, *, a_multiplier, b_multiplier, shift, a_zero_point, b_zero_point, output_zero_point,
                   out_min, out_max, out_dtype):
    """numpy int64 version of qadd."""
    acc = ((np.asarray(a, np.int64) - a_zero_point) * np.int64(a_multiplier)
           + (np.asarray(b, np.int64) - b_zero_point) * np.int64(b_multiplier))
    out = ((acc + (np.int64(1) << (shift - 1))) >> shift) + output_zero_point
    return scheme.saturate(out, out_dtype, out_min, out_max)


def qmul(a, b, *, multiplier, shift, a_zero_point, b_zero_point, output_zero_point, out_min, out_max, out_dtype):
    """numpy int64 version of qmul."""
    product = (np.asarray(a, np.int64) - a_zero_point) * (np.asarray(b, np.int64) - b_zero_point)
    out = scheme.requantize(product, multiplier, shift).astype(np.int64) + output_zero_point
    return scheme.saturate(out, out_dtype, out_min, out_max)


def qrequantize(x, *, multiplier, shift, input_zero_point, output_zero_point, out_min, out_max,
                out_dtype):
    """numpy int64 version of qrequantize."""
    shifted = (np.asarray(x, np.int64) - input_zero_point) << QSHIFT
    out = scheme.requantize(shifted, multiplier, shift).astype(np.int64) + output_zero_point
    return scheme.saturate(out, out_dtype, out_min, out_max)


def qavg_pool2d(data, *, pool_size, strides, padding, multiplier, shift, input_zero_point,
                output_zero_point, out_min, out_max, out_dtype):
    """numpy int64 version of qavg_pool2d."""
    kh, kw = pool_size
    padded = pad_nhwc(np.asarray(data, np.int64) - input_zero_point, padding, 0)
    oh = out_size(data.shape[1], kh, strides[0], 1, padding[0], padding[2])
    ow = out_size(data.shape[2], kw, strides[1], 1, padding[1], padding[3])
    acc = windows(padded, kh, kw, strides, (1, 1), oh, ow).sum(axis=(3, 4))
    out = scheme.requantize(acc, multiplier, shift).astype(np.int64) + output_zero_point
    return scheme.saturate(out, out_dtype, out_min, out_max)


def qmax_pool2d(data, *, pool_size, strides, padding, dilation=(1, 1)):
    """numpy version of qmax_pool2d."""
    kh, kw = pool_size
    padded = pad_nhwc(data, padding, scheme.DTYPE_RANGES[str(data.dtype)][0])
    oh = out_size(data.shape[1], kh, strides[0], dilation[0], padding[0], padding[2])
    ow = out_size(data.shape[2], kw, strides[1], dilation[1], padding[1], padding[3])
    return windows(padded, kh, kw, strides, dilation, oh, ow).max(axis=(3, 4)).astype(data.dtype)
