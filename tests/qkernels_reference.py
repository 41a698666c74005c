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


# ---- onnxruntime's com.microsoft QOperator ops, by their documented arithmetic, for onnx's reference evaluator
def _quantize(x, scale, zero_point):
    info = np.iinfo(np.asarray(zero_point).dtype)
    return np.clip(np.rint(x / scale) + zero_point, info.min, info.max).astype(np.asarray(zero_point).dtype)


def _real(q, scale, zero_point):
    return (q.astype(np.float64) - np.asarray(zero_point, np.float64)) * np.asarray(scale, np.float64)


def _microsoft_ops():
    from onnx.reference.op_run import OpRun

    class QGemm(OpRun):
        """Y = alpha * A' B' + C, C int32 at scale alpha * a_scale * b_scale; quantized when y_scale is given."""

        op_domain = "com.microsoft"

        def _run(self, a, a_scale, a_zp, b, b_scale, b_zp, c=None, y_scale=None, y_zp=None, alpha=1.0, transA=0,
                 transB=0):
            a = a.astype(np.int64) - np.asarray(a_zp, np.int64)
            b = b.astype(np.int64)
            b_zp, b_scale = np.asarray(b_zp, np.int64), np.asarray(b_scale, np.float64)
            b = b - (b_zp.reshape(-1, 1) if transB and b_zp.ndim else b_zp)
            acc = (a.T if transA else a) @ (b.T if transB else b) + (0 if c is None else c.astype(np.int64))
            y = alpha * float(a_scale) * b_scale * acc
            return (y.astype(np.float32) if y_scale is None else _quantize(y, y_scale, y_zp),)

    class QLinearAdd(OpRun):
        op_domain = "com.microsoft"

        def _run(self, a, a_scale, a_zp, b, b_scale, b_zp, c_scale, c_zp):
            return (_quantize(_real(a, a_scale, a_zp) + _real(b, b_scale, b_zp), c_scale, c_zp),)

    class QLinearGlobalAveragePool(OpRun):
        op_domain = "com.microsoft"

        def _run(self, x, x_scale, x_zp, y_scale, y_zp, channels_last=0):
            axes = tuple(range(1, x.ndim - 1)) if channels_last else tuple(range(2, x.ndim))
            return (_quantize(_real(x, x_scale, x_zp).mean(axis=axes, keepdims=True), y_scale, y_zp),)

    return [QGemm, QLinearAdd, QLinearGlobalAveragePool]


MICROSOFT_QOPS = _microsoft_ops()
