"""Integer (int8) kernels as TE computes, channels-last, for ``BlockBuilder.emit_te`` (their numpy references,
the tests' oracles, are tests/qkernels_reference.py).

Every kernel ends with the same epilogue, the arithmetic of ``schedules.scheme``:
``saturate(requantize(acc, M, s) + zero_point_out, out_min, out_max)``, where requantize is the
32x32->64 widening multiply ``(int64(acc) * int64(M) + 2^(s-1)) >> s``.  The product is written as a
multiply of two sign-extended int32 values so LLVM emits vpmuldq / smull instead of a 64x64 multiply.
When every shift is in 33..62 (``high_word=True``, nearly all layers) the same result is computed in 32-bit
lanes from the high word of the product (``scheme.requantize_high_word``): no 64-bit lanes to widen to and
narrow from.

Convolution and dense keep the accumulation (``int32(a) * int32(w)`` summed into int32) in its own
block, in exactly the form of the dot-product tensor intrinsics, so ``schedules.dot_product`` can
tensorize it; the epilogue is a separate elementwise block that the schedule fuses into the write-back.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx, topi

from schedules import scheme

QSHIFT = 20  # left shift applied to the 8-bit input of qrequantize (TFLite's kLeftShift), for precision


# ---------------------------------------------------------------------------------------------- epilogue
def _requantize(acc, multiplier, shift, bias=None):
    """round((acc + bias) * M / 2^s) with ties to +inf, in int64, back to int32 (scheme.requantize)."""
    if bias is not None:
        acc = _add_i32(acc, bias)
    shift64 = tirx.Cast("int64", shift)
    rounding = tirx.const(1, "int64") << (shift64 - tirx.const(1, "int64"))
    product = tirx.Cast("int64", acc) * tirx.Cast("int64", multiplier)
    return tirx.Cast("int32", (product + rounding) >> shift64)


def _requantize_high_word(acc, multiplier, shift, bias=None):
    """_requantize for shifts 33 <= s <= 62 (scheme.requantize_high_word): int32 but for the high word of one
    32x32-bit product.  In a plain loop LLVM emits that as its multiply-high (x86: vpmuldq on even and odd lanes
    + 3 shuffles per 16 lanes); in the conv kernels it hoists the sign extension of the loop-invariant
    per-channel multiplier out of the tile loop, and the high word costs zero-extends, vpmuldq, shifts and
    narrows on two halves (10 instructions per 16 lanes), still fewer than the 64-bit path.

    The shift is clamped to that range: TVM's simplifier folded an unbounded ``x >> (s - 32)`` to a constant.
    """
    if bias is not None:
        acc = _add_i32(acc, bias)
    high = tirx.Cast("int32", (tirx.Cast("int64", acc) * tirx.Cast("int64", multiplier)) >> tirx.const(32, "int64"))
    lowest, highest = scheme.HIGH_WORD_SHIFTS  # 33, 62
    shift = tirx.max(tirx.min(shift, tirx.const(highest, "int32")), tirx.const(lowest, "int32"))
    return (high + (tirx.const(1, "int32") << (shift - 33))) >> (shift - 32)


def _add_i32(a, b):
    """a + b in int32, kept an int32 add for LLVM.

    TVM's simplifier rewrites ``int64(a + b)`` into ``int64(a) + int64(b)``, after which LLVM sees a 33-bit
    multiplicand and uses a full 64x64 multiply (vpmullq) instead of vpmuldq / smull.  Spelling the sum
    as ``int32(int64(a) + int64(b))`` survives the simplifier and LLVM narrows it back to an int32 add.
    """
    return tirx.Cast("int32", tirx.Cast("int64", a) + tirx.Cast("int64", b))


def _requantize_const(acc, multiplier: int, shift: int):
    """_requantize with python-int parameters: the rounding term folds to a constant.  ``acc`` must not be
    a sum (see _add_i32)."""
    product = tirx.Cast("int64", acc) * tirx.const(int(multiplier), "int64")
    shift = int(shift)
    return tirx.Cast("int32", (product + tirx.const(1 << (shift - 1), "int64")) >> tirx.const(shift, "int64"))


def _saturate(value, dtype: str, lo: int, hi: int):
    """Clamp an int32 value to [lo, hi] within the range of ``dtype`` (scheme.saturate) and cast."""
    qmin, qmax = scheme.DTYPE_RANGES[dtype]
    lo, hi = max(int(lo), qmin), min(int(hi), qmax)
    return tirx.Cast(dtype, tirx.max(tirx.min(value, tirx.const(hi, "int32")), tirx.const(lo, "int32")))


def _i32(x):
    return tirx.Cast("int32", x)


def _pad_nhwc(data, padding, value, name):
    top, left, bottom, right = padding
    if not any((top, left, bottom, right)):
        return data
    return topi.nn.pad(data, [0, top, left, 0], [0, bottom, right, 0], pad_value=tirx.const(value, data.dtype),
                       name=name)


def _out_size(size, kernel, stride, dilation, before, after):
    return (int(size) + before + after - dilation * (int(kernel) - 1) - 1) // stride + 1


# ---------------------------------------------------------------------------------------------- kernels
def qconv2d(data, weight, bias, multiplier, shift, *, strides, padding, dilation, groups, input_zero_point,
            output_zero_point, out_min, out_max, out_dtype, high_word=False):
    """Quantized NHWC conv2d: data [N,H,W,C] u8/s8, weight s8, bias/M/s [O] int32.  The weight is HWIO
    [KH,KW,C//groups,O], except for a grouped conv (1 < groups, several input channels per group), whose
    weight is [groups, KH, KW, C//groups, O//groups] (:func:`group_weight`).

    ``padding`` is (top, left, bottom, right); the data is padded with ``input_zero_point`` (real 0.0).
    ``bias`` already holds the zero-point compensation ``-input_zero_point * sum(w)`` plus the quantized
    float bias, so the accumulator is just ``sum(int32(x) * int32(w)) + bias``.  Depthwise convolutions
    (groups == C, one input channel per group) multiply in int16 (an 8x8-bit product always fits),
    which vectorizes to widening 16-bit multiplies.
    """
    n, height, width, channels = (int(d) for d in data.shape)
    grouped = len(weight.shape) == 5
    if grouped:
        _, kh, kw, group_channels, per_group = (int(d) for d in weight.shape)
        out_channels = per_group * groups
    else:
        kh, kw, group_channels, out_channels = (int(d) for d in weight.shape)
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = padding
    if channels != group_channels * groups or out_channels % groups:
        raise ValueError(f"qconv2d: {channels} input / {out_channels} output channels are not {groups} groups")
    if grouped != (1 < groups and group_channels > 1):
        raise ValueError("qconv2d: a grouped conv takes its weight as [groups, KH, KW, C/groups, O/groups], "
                         "any other an HWIO weight")
    oh = _out_size(height, kh, sh, dh, top, bottom)
    ow = _out_size(width, kw, sw, dw, left, right)
    padded = _pad_nhwc(data, padding, input_zero_point, "qconv2d_pad")
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")

    def window(p, c):  # input of the window of flattened output pixel p (see below), channel c
        b, y, x = p // (oh * ow), p // ow % oh, p % ow
        return padded[b, y * sh + ry * dh, x * sw + rx * dw, c]

    if group_channels == 1 and groups > 1:  # depthwise, possibly with a channel multiplier
        multiplier_c = out_channels // channels
        acc = te.compute(
            (n, oh, ow, out_channels),
            lambda b, y, x, o: te.sum(
                _i32(
                    tirx.Cast("int16", padded[b, y * sh + ry * dh, x * sw + rx * dw, o // multiplier_c])
                    * tirx.Cast("int16", weight[ry, rx, 0, o])
                ),
                axis=[ry, rx],
            ),
            name="qconv2d_acc",
        )
        return _channel_epilogue(acc, acc.shape, bias, multiplier, shift, output_zero_point, out_min, out_max,
                                 out_dtype, "qconv2d", high_word)
    # Dense and grouped convolutions accumulate over flattened output pixels [N*OH*OW, ...]: the register
    # tile of the schedule then spans rows of the image, so any image width tiles well.
    rc = te.reduce_axis((0, group_channels), "rc")
    if grouped:
        # [pixels, groups, O/groups]: the input channel g * C/groups + rc is invariant along the innermost
        # axis and the weight's output channel is that axis, the form of the dot-product intrinsics (with the
        # weight in the HWIO layout the input channel would depend on the output channel: nothing vectorizes).
        acc = te.compute(
            (n * oh * ow, groups, per_group),
            lambda p, g, o: te.sum(_i32(window(p, g * group_channels + rc)) * _i32(weight[g, ry, rx, rc, o]),
                                   axis=[ry, rx, rc]),
            name="qconv2d_acc",
        )

        def pixel(b, y, x, o):
            return acc[(b * oh + y) * ow + x, o // per_group, o % per_group]
    else:
        acc = te.compute(
            (n * oh * ow, out_channels),
            lambda p, o: te.sum(_i32(window(p, rc)) * _i32(weight[ry, rx, rc, o]), axis=[ry, rx, rc]),
            name="qconv2d_acc",
        )

        def pixel(b, y, x, o):
            return acc[(b * oh + y) * ow + x, o]
    return _channel_epilogue(pixel, (n, oh, ow, out_channels), bias, multiplier, shift, output_zero_point, out_min,
                             out_max, out_dtype, "qconv2d", high_word)


def group_weight(hwio: np.ndarray, groups: int) -> np.ndarray:
    """An HWIO weight [KH, KW, C/groups, O] as a grouped qconv2d takes it: [groups, KH, KW, C/groups, O/groups]."""
    kh, kw, group_channels, out_channels = hwio.shape
    return np.ascontiguousarray(
        hwio.reshape(kh, kw, group_channels, groups, out_channels // groups).transpose(3, 0, 1, 2, 4))


def qdense(data, weight, bias, multiplier, shift, *, input_zero_point, output_zero_point, out_min, out_max,
           out_dtype, high_word=False):
    """Quantized dense: data [M,K] u8/s8, weight [K,N] s8, bias/M/s [N] int32 (bias includes -zin*sum(w))."""
    del input_zero_point  # folded into the bias by the caller; kept for a uniform signature
    rows, depth = (int(d) for d in data.shape)
    out_features = int(weight.shape[1])
    rk = te.reduce_axis((0, depth), "rk")
    acc = te.compute(
        (rows, out_features),
        lambda m, j: te.sum(_i32(data[m, rk]) * _i32(weight[rk, j]), axis=[rk]),
        name="qdense_acc",
    )
    return _channel_epilogue(acc, acc.shape, bias, multiplier, shift, output_zero_point, out_min, out_max, out_dtype,
                             "qdense", high_word)


def _channel_epilogue(acc, shape, bias, multiplier, shift, zero_point, out_min, out_max, out_dtype, name,
                      high_word=False):
    """Per-output-channel (last axis) bias, requantize, zero point, clamp of ``acc(*index)`` over ``shape``;
    ``high_word``: every shift is in scheme.HIGH_WORD_SHIFTS (scheme.uses_high_word), requantize in 32 bits."""

    def epilogue(*idx):
        c = idx[-1]
        requantize = _requantize_high_word if high_word else _requantize
        value = requantize(acc(*idx), multiplier[c], shift[c], bias[c]) + tirx.const(int(zero_point), "int32")
        return _saturate(value, out_dtype, out_min, out_max)

    return te.compute(shape, epilogue, name=name)


def qadd(a, b, *, a_multiplier, b_multiplier, shift, a_zero_point, b_zero_point, output_zero_point, out_min,
         out_max, out_dtype):
    """Quantized elementwise add with numpy broadcasting, rounded once (as a float add then quantize would be).

    out = saturate(round(((a - za) * Ma + (b - zb) * Mb) / 2^s) + zo) in int64, where Ma / 2^s ~= scale_a /
    scale_out and Mb / 2^s ~= scale_b / scale_out share the shift s (scheme.add_multipliers).  Rounding each
    operand to the output step first and then adding (two roundings) put a third of the outputs one step off
    a float add.
    """
    shape = _broadcast_shape(a.shape, b.shape)

    def operand(t, idx):
        offset = len(shape) - len(t.shape)
        return t(*[i if int(d) != 1 else 0 for i, d in zip(idx[offset:], t.shape)])

    def scaled(t, idx, zero_point, multiplier):
        return (tirx.Cast("int64", operand(t, idx)) - tirx.const(int(zero_point), "int64")) * tirx.const(
            int(multiplier), "int64")

    def add(*idx):
        acc = (scaled(a, idx, a_zero_point, a_multiplier) + scaled(b, idx, b_zero_point, b_multiplier)
               + tirx.const(1 << (int(shift) - 1), "int64"))
        value = tirx.Cast("int32", acc >> tirx.const(int(shift), "int64")) + tirx.const(int(output_zero_point),
                                                                                     "int32")
        return _saturate(value, out_dtype, out_min, out_max)

    return te.compute(shape, add, name="qadd")


def qmul(a, b, *, multiplier, shift, a_zero_point, b_zero_point, output_zero_point, out_min, out_max,
         out_dtype):
    """Quantized elementwise product with numpy broadcasting (squeeze-excitation: x times a per-channel gate).

    out = saturate(requantize((a - za) * (b - zb), M, s) + zo), M / 2^s ~= scale_a * scale_b / scale_out; the
    product of two 8-bit differences is below 2^17, so it is exact in int32 and rounded once.
    """
    shape = _broadcast_shape(a.shape, b.shape)

    def operand(t, idx, zero_point):
        offset = len(shape) - len(t.shape)
        value = t(*[i if int(d) != 1 else 0 for i, d in zip(idx[offset:], t.shape)])
        return _i32(value) - tirx.const(int(zero_point), "int32")

    def mul(*idx):
        product = operand(a, idx, a_zero_point) * operand(b, idx, b_zero_point)
        value = _requantize_const(product, multiplier, shift) + tirx.const(int(output_zero_point), "int32")
        return _saturate(value, out_dtype, out_min, out_max)

    return te.compute(shape, mul, name="qmul")


def _broadcast_shape(sa, sb):
    sa, sb = [int(d) for d in sa], [int(d) for d in sb]
    rank = max(len(sa), len(sb))
    sa, sb = [1] * (rank - len(sa)) + sa, [1] * (rank - len(sb)) + sb
    if any(x != y and 1 not in (x, y) for x, y in zip(sa, sb)):
        raise ValueError(f"shapes {sa} and {sb} do not broadcast")
    return [max(x, y) for x, y in zip(sa, sb)]


def qrequantize(x, *, multiplier, shift, input_zero_point, output_zero_point, out_min, out_max, out_dtype):
    """Per-tensor rescale of an 8-bit tensor to new parameters: saturate(requantize((x - zin) << 20) + zo).

    Used before a concat of differently quantized inputs, or for Q(DQ(x)) with different parameters;
    M, s = fixed_point_multiplier(scale_in / (scale_out * 2**20)).
    """

    def rescale(*idx):
        shifted = (_i32(x(*idx)) - int(input_zero_point)) << QSHIFT
        value = _requantize_const(shifted, multiplier, shift) + tirx.const(int(output_zero_point), "int32")
        return _saturate(value, out_dtype, out_min, out_max)

    return te.compute(x.shape, rescale, name="qrequantize")


def qlookup(x, table, *, first_code: int):
    """out[i] = table[x[i] - first_code]: an elementwise function of an 8-bit tensor, tabulated over its codes
    (relay_passes.quantize.lookup); the table is a constant of 256 output codes."""
    return te.compute(x.shape, lambda *i: table[_i32(x(*i)) - first_code], name="qlookup")


def qavg_pool2d(data, *, pool_size, strides, padding, multiplier, shift, input_zero_point, output_zero_point,
                out_min, out_max, out_dtype):
    """Average pool with a constant divisor (count_include_pad; global pooling: pool_size == (H, W)), NHWC.

    ``padding`` is (top, left, bottom, right), as for qconv2d.

    acc = sum over the window of (x - zin), padding contributing 0; out = saturate(requantize(acc, M, s) + zo)
    where M, s = fixed_point_multiplier(scale_in / (scale_out * kh * kw)) folds in the divisor.
    """
    kh, kw = pool_size
    sh, sw = strides
    n, height, width, channels = (int(d) for d in data.shape)
    oh = _out_size(height, kh, sh, 1, padding[0], padding[2])
    ow = _out_size(width, kw, sw, 1, padding[1], padding[3])
    padded = _pad_nhwc(data, padding, input_zero_point, "qavg_pool2d_pad")  # zin - zin contributes 0
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    acc = te.compute(
        (n, oh, ow, channels),
        lambda b, y, x, c: te.sum(_i32(padded[b, y * sh + ry, x * sw + rx, c]), axis=[ry, rx]),
        name="qavg_pool2d_acc",
    )
    offset = int(input_zero_point) * kh * kw

    def epilogue(*idx):
        value = _requantize_const(_add_i32(acc(*idx), -offset), multiplier, shift) + tirx.const(
            int(output_zero_point), "int32")
        return _saturate(value, out_dtype, out_min, out_max)

    return te.compute(acc.shape, epilogue, name="qavg_pool2d")


def qmax_pool2d(data, *, pool_size, strides, padding, dilation=(1, 1)):
    """Max pool on quantized values (monotonic, so no rescale), NHWC; ``padding`` (top, left, bottom, right)
    is filled with the dtype's minimum.  The output keeps the input's dtype and quantization parameters."""
    kh, kw = pool_size
    (sh, sw), (dh, dw) = strides, dilation
    n, height, width, channels = (int(d) for d in data.shape)
    oh = _out_size(height, kh, sh, dh, padding[0], padding[2])
    ow = _out_size(width, kw, sw, dw, padding[1], padding[3])
    padded = _pad_nhwc(data, padding, scheme.DTYPE_RANGES[str(data.dtype)][0], "qmax_pool2d_pad")
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    return te.compute(
        (n, oh, ow, channels),
        lambda b, y, x, c: te.max(padded[b, y * sh + ry * dh, x * sw + rx * dw, c], axis=[ry, rx]),
        name="qmax_pool2d",
    )
