"""numpy int64 versions of the bit-serial kernels (schedules/bitserial.py), with no bit planes: the exact
integer conv / dense of the activation codes with the weight integers, then scheme's epilogue."""

import numpy as np
from qkernels_reference import out_size, pad_nhwc, windows

from schedules import scheme
from schedules.bitserial import CODE_OFFSET, weight_integers


def conv2d_acc(data, weight_codes_hwio, *, weight_bits, strides=(1, 1), padding=(0, 0, 0, 0),
               dilation=(1, 1), encoding="sawb", input_zero_point=0) -> np.ndarray:
    """Exact int64 conv of activation codes with the weight integers, NHWC -> [N, OH, OW, O] (no bit planes)."""
    kh, kw = weight_codes_hwio.shape[:2]
    offset = CODE_OFFSET[str(np.asarray(data).dtype)]
    padded = pad_nhwc(np.asarray(data, np.int64), padding, input_zero_point) + offset
    oh = out_size(data.shape[1], kh, strides[0], dilation[0], padding[0], padding[2])
    ow = out_size(data.shape[2], kw, strides[1], dilation[1], padding[1], padding[3])
    taps = windows(padded, kh, kw, strides, dilation, oh, ow)
    w = weight_integers(weight_codes_hwio, weight_bits, encoding).astype(np.int64)
    return np.tensordot(taps, w, axes=([3, 4, 5], [0, 1, 2]))


def qconv2d(data, weight_codes_hwio, bias, multiplier, shift, *, weight_bits, strides=(1, 1),
            padding=(0, 0, 0, 0), dilation=(1, 1), encoding="sawb", input_zero_point=0,
            output_zero_point=0, out_min=0, out_max=255, out_dtype="uint8") -> np.ndarray:
    acc = conv2d_acc(data, weight_codes_hwio, weight_bits=weight_bits, strides=strides, padding=padding,
                     dilation=dilation, encoding=encoding, input_zero_point=input_zero_point)
    return _np_epilogue(acc, bias, multiplier, shift, output_zero_point, out_min, out_max, out_dtype)


def dense_acc(data, weight_codes_kn, *, weight_bits, encoding="sawb") -> np.ndarray:
    codes = np.asarray(data, np.int64) + CODE_OFFSET[str(np.asarray(data).dtype)]
    return codes @ weight_integers(weight_codes_kn, weight_bits, encoding).astype(np.int64)


def qdense(data, weight_codes_kn, bias, multiplier, shift, *, weight_bits, encoding="sawb",
           output_zero_point=0, out_min=0, out_max=255, out_dtype="uint8") -> np.ndarray:
    acc = dense_acc(data, weight_codes_kn, weight_bits=weight_bits, encoding=encoding)
    return _np_epilogue(acc, bias, multiplier, shift, output_zero_point, out_min, out_max, out_dtype)


def _np_epilogue(acc, bias, multiplier, shift, zero_point, out_min, out_max, out_dtype):
    out = scheme.requantize(acc + np.asarray(bias, np.int64), multiplier, shift).astype(np.int64) + zero_point
    return scheme.saturate(out, out_dtype, out_min, out_max)
