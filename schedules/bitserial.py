"""Bit-serial low-bit kernels (AND + popcount) as TE computes for ``BlockBuilder.emit_te``; plus numpy references.

Operands: activations are ``a``-bit unsigned codes (PACT: real = code * alpha / (2^a - 1), zero point 0; any
uint8 tensor is an 8-bit code with its zero point folded into the bias), one byte per code, channels last;
int8 activations q (realize's ARM convention) count as the codes q + 128.  Weights are ``w``-bit codes prepacked
at compile time into bit planes along the reduction (input-channel) axis (``schedules.bitpack``).
A SAWB weight code c stands for the odd integer 2c - (2^w - 1) ({-3, -1, 1, 3} for 2 bits), so with A_i, W_j
the bit planes

    sum_k a_k * (2 c_k - (2^w - 1)) = sum_ij 2^(i+j+1) popcount(A_i & W_j) - (2^w - 1) * sum_i 2^i popcount(A_i)

is the exact integer dot product.  The second sum (the sum of the activation codes) depends on the output
pixel only: it is its own small reduction block, computed once per pixel instead of once per output channel
(2.7x faster on a 56x56x64 conv).  "unsigned" weights (code c stands for c) drop it.  Padding bits (channel
counts that are not a multiple of the word) are 0 in both operands and count nothing.

The activation planes are packed at run time by a reduction block (an OR written as a sum of disjoint bits),
so the default CPU schedule keeps it as its own pass instead of inlining it into every output channel.  The
accumulation block vectorizes along the output channels: a vectorized ``popcount`` is VPOPCNT[BWDQ] with
AVX512-VPOPCNTDQ/BITALG, ``cnt`` + pairwise adds with NEON.  The int32 accumulator gets the requantize
epilogue of ``schedules.qkernels`` (bias, fixed-point multiplier, zero point, clamp): with out range
[0, 2^k - 1] the output is directly the next layer's k-bit code.

Targets without a popcount instruction use the int8 kernels instead (:func:`conv2d_for_target`): the weight
codes become their int8 integers at compile time and the activations feed ``qkernels.qconv2d`` / ``qdense``
unchanged.
"""

from __future__ import annotations

import functools

import numpy as np
from tvm import te, tirx

from targets.features import has_feature

from . import bitpack, qkernels

ENCODINGS = ("sawb", "unsigned")


def _word_bits(dtype) -> int:
    return bitpack.word_bits(str(dtype))


def _code(value, dtype: str):
    """The unsigned code of an activation: uint8 as is; int8 is realize's ARM convention q - 128, so q + 128."""
    if dtype == "int8":
        return tirx.Cast("int32", value) + tirx.const(CODE_OFFSET["int8"], "int32")
    return value


CODE_OFFSET = {"uint8": 0, "int8": 128}  # code = activation + offset


def pack_bits(codes, bits: int, word: str = "uint32", name: str = "bitpack"):
    """TE: codes [..., C] -> planes [..., bits, ceil(C / word_bits)] of ``word`` (bitpack.bitplanes layout).

    uint8 values are the codes; int8 values q stand for the codes q + 128 (see CODE_OFFSET)."""
    nbits = _word_bits(word)
    channels = int(codes.shape[-1])
    words = -(-channels // nbits)
    j = te.reduce_axis((0, nbits), "pack_j")

    def plane(*idx):
        *outer, p, w = idx
        c = w * nbits + j
        if channels % nbits:  # the last word reads past the channels: clamp (those bits are masked off below)
            c = tirx.min(c, channels - 1)  # (only then: a clamped index makes LLVM gather instead of load)
        code = _code(codes(*outer, c), str(codes.dtype))
        bit = (tirx.Cast(word, code) >> tirx.Cast(word, p)) & tirx.const(1, word)
        value = bit << tirx.Cast(word, j)
        if channels % nbits:
            value = tirx.if_then_else(w * nbits + j < channels, value, tirx.const(0, word))
        return te.sum(value, axis=[j])

    return te.compute((*codes.shape[:-1], bits, words), plane, name=name)


def _popcount_i32(x):
    return tirx.Cast("int32", tirx.popcount(x))


def _dot_planes(a_plane, w_plane, activation_bits: int, weight_bits: int):
    """sum_ij 2^(i+j) popcount(A_i & W_j) over one word (sawb's factor 2, of 2c - (2^w - 1), is applied once to
    the accumulated sum by _corrected, not to every word: one shift less per word)."""
    return functools.reduce(lambda s, t: s + t, [
        _popcount_i32(a_plane(i) & w_plane(j)) * (2 ** (i + j))
        for i in range(activation_bits) for j in range(weight_bits)])


def _code_sum(a_plane, activation_bits: int):
    """sum_i 2^i popcount(A_i) over one word: the sum of the activation codes (the sawb correction's factor)."""
    return functools.reduce(lambda s, t: s + t,
                            [_popcount_i32(a_plane(i)) * (2**i) for i in range(activation_bits)])


def _corrected(acc, code_sum, weight_bits: int, encoding: str):
    """2 * acc(p, o) - (2^w - 1) * code_sum(p) for sawb weights (the correction is per pixel, computed once per
    pixel instead of once per output channel); acc itself for unsigned weights."""
    if encoding != "sawb":
        return lambda p, o: acc[p, o]
    return lambda p, o: acc[p, o] * 2 - code_sum[p] * (2**weight_bits - 1)


def _check(encoding, data, weight_dtype):
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown weight encoding {encoding!r}; expected one of {ENCODINGS}")
    if str(data.dtype) not in CODE_OFFSET:
        raise ValueError(f"bit-serial kernels take uint8 (or offset int8) activation codes, got {data.dtype}")
    _word_bits(weight_dtype)


def bitserial_conv2d(data, weight_planes, *, activation_bits, weight_bits, strides=(1, 1), padding=(0, 0, 0, 0),
                     dilation=(1, 1), encoding="sawb", input_zero_point=0):
    """Bit-serial NHWC conv2d, the int32 accumulator [N, OH, OW, O] (no epilogue)."""
    acc, shape = _conv2d_acc(data, weight_planes, activation_bits=activation_bits, weight_bits=weight_bits,
                             strides=strides, padding=padding, dilation=dilation, encoding=encoding,
                             input_zero_point=input_zero_point)
    oh, ow = shape[1], shape[2]
    return te.compute(shape, lambda b, y, x, o: acc((b * oh + y) * ow + x, o), name="bitserial_conv2d")


def _conv2d_acc(data, weight_planes, *, activation_bits, weight_bits, strides, padding, dilation, encoding,
                input_zero_point=0):
    """Bit-serial NHWC conv2d accumulator: (int32 [N*OH*OW, O], NHWC shape); pixels flattened as in qconv2d.

    data: uint8 codes [N, H, W, C]; weight_planes: [KH, KW, weight_bits, ceil(C / word_bits), O] (HWIO codes
    packed along I).  ``padding`` (top, left, bottom, right) pads with ``input_zero_point`` (real 0, in the
    data's dtype; 0 for uint8 PACT codes), before the bit planes are packed.  int8 data q counts as codes q + 128.
    """
    word = str(weight_planes.dtype)
    _check(encoding, data, word)
    n, height, width, channels = (int(d) for d in data.shape)
    kh, kw, wbits, words, out_channels = (int(d) for d in weight_planes.shape)
    if wbits != weight_bits or words != -(-channels // _word_bits(word)):
        raise ValueError(f"weight planes {weight_planes.shape} do not fit {weight_bits}-bit weights over {channels} "
                         f"channels in {word} words")
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = padding
    oh = qkernels._out_size(height, kh, sh, dh, top, bottom)
    ow = qkernels._out_size(width, kw, sw, dw, left, right)
    padded = qkernels._pad_nhwc(data, padding, input_zero_point, "bitserial_pad")
    planes = pack_bits(padded, activation_bits, word, name="bitserial_pack")
    ry, rx, rw = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx"), te.reduce_axis((0, words), "rw")

    def window(p, i, ry, rx, rw):
        b, y, x = p // (oh * ow), p // ow % oh, p % ow
        return planes[b, y * sh + ry * dh, x * sw + rx * dw, i, rw]

    def acc(p, o):
        return te.sum(_dot_planes(lambda i: window(p, i, ry, rx, rw), lambda j: weight_planes[ry, rx, j, rw, o],
                                  activation_bits, weight_bits), axis=[ry, rx, rw])

    acc = te.compute((n * oh * ow, out_channels), acc, name="bitserial_conv2d_acc")
    code_sum = None
    if encoding == "sawb":
        sy, sx, sw_ = te.reduce_axis((0, kh), "sy"), te.reduce_axis((0, kw), "sx"), te.reduce_axis((0, words), "sw")
        code_sum = te.compute(
            (n * oh * ow,),
            lambda p: te.sum(_code_sum(lambda i: window(p, i, sy, sx, sw_), activation_bits), axis=[sy, sx, sw_]),
            name="bitserial_conv2d_codesum")
    return _corrected(acc, code_sum, weight_bits, encoding), (n, oh, ow, out_channels)


def bitserial_qconv2d(data, weight_planes, bias, multiplier, shift, *, activation_bits, weight_bits, strides=(1, 1),
                      padding=(0, 0, 0, 0), dilation=(1, 1), encoding="sawb", input_zero_point=0, output_zero_point=0,
                      out_min=0, out_max=255, out_dtype="uint8", high_word=False):
    """Bit-serial conv2d + requantize: saturate(requantize(acc + bias, M, s) + zo), NHWC [N, OH, OW, O].

    bias / multiplier / shift are int32 [O] (qkernels' epilogue; as there, the bias holds the zero-point term
    -input_zero_point * sum(w)); out_min/out_max = 0/2^k-1 requantize straight to k-bit codes for the next
    bit-serial layer.
    """
    acc, shape = _conv2d_acc(data, weight_planes, activation_bits=activation_bits, weight_bits=weight_bits,
                             strides=strides, padding=padding, dilation=dilation, encoding=encoding,
                             input_zero_point=input_zero_point)
    oh, ow = shape[1], shape[2]
    return qkernels._channel_epilogue(lambda b, y, x, o: acc((b * oh + y) * ow + x, o), shape, bias, multiplier,
                                      shift, output_zero_point, out_min, out_max, out_dtype, "bitserial_qconv2d",
                                      high_word)


def bitserial_dense(data, weight_planes, *, activation_bits, weight_bits, encoding="sawb"):
    """Bit-serial dense accumulator: data uint8 codes [M, K], weight planes [weight_bits, ceil(K/word), N] -> int32 [M, N]."""
    acc = _dense(data, weight_planes, activation_bits, weight_bits, encoding)
    return te.compute((int(data.shape[0]), int(weight_planes.shape[2])), acc, name="bitserial_dense")


def _dense(data, weight_planes, activation_bits, weight_bits, encoding):
    word = str(weight_planes.dtype)
    _check(encoding, data, word)
    rows, depth = (int(d) for d in data.shape)
    wbits, words, out_features = (int(d) for d in weight_planes.shape)
    if wbits != weight_bits or words != -(-depth // _word_bits(word)):
        raise ValueError(f"weight planes {weight_planes.shape} do not fit {weight_bits}-bit weights over {depth} "
                         f"inputs in {word} words")
    planes = pack_bits(data, activation_bits, word, name="bitserial_pack")
    return _dense_acc(planes, weight_planes, activation_bits, weight_bits, encoding)


def _dense_acc(planes, weight_planes, activation_bits, weight_bits, encoding):
    """(m, j) -> int32 accumulator expression of a bit-serial dense over packed activation planes [M, a, words]."""
    rows, _, words = (int(d) for d in planes.shape)
    out_features = int(weight_planes.shape[2])
    rw = te.reduce_axis((0, words), "rw")
    acc = te.compute(
        (rows, out_features),
        lambda m, j: te.sum(_dot_planes(lambda i: planes[m, i, rw], lambda jj: weight_planes[jj, rw, j],
                                        activation_bits, weight_bits), axis=[rw]),
        name="bitserial_dense_acc",
    )
    code_sum = None
    if encoding == "sawb":
        sw_ = te.reduce_axis((0, words), "sw")
        code_sum = te.compute((rows,), lambda m: te.sum(_code_sum(lambda i: planes[m, i, sw_], activation_bits),
                                                        axis=[sw_]), name="bitserial_dense_codesum")
    return _corrected(acc, code_sum, weight_bits, encoding)


def bitserial_qdense(data, weight_planes, bias, multiplier, shift, *, activation_bits, weight_bits, encoding="sawb",
                     input_zero_point=0, output_zero_point=0, out_min=0, out_max=255, out_dtype="uint8",
                     high_word=False):
    """Bit-serial dense + requantize epilogue (as bitserial_qconv2d), [M, N]; as in qkernels.qdense the input zero
    point is already folded into the bias (-zp * sum(w)), so it is accepted for a uniform signature only."""
    del input_zero_point
    acc = _dense(data, weight_planes, activation_bits, weight_bits, encoding)
    shape = (int(data.shape[0]), int(weight_planes.shape[2]))
    return qkernels._channel_epilogue(acc, shape, bias, multiplier, shift, output_zero_point, out_min, out_max,
                                      out_dtype, "bitserial_qdense", high_word)


# ---------------------------------------------------------------------------------------------- weights and targets
def weight_integers(codes, bits: int, encoding: str = "sawb") -> np.ndarray:
    """The integer a weight code stands for: 2c - (2^bits - 1) (sawb) or c (unsigned), int32."""
    codes = np.asarray(codes, np.int32)
    return 2 * codes - (2**bits - 1) if encoding == "sawb" else codes


def conv2d_weight_planes(codes_hwio, bits: int, word: str = "uint32") -> np.ndarray:
    """[KH, KW, I, O] codes -> [KH, KW, bits, words, O] planes for bitserial_qconv2d."""
    return bitpack.bitplanes(codes_hwio, bits, axis=2, word=word)


def dense_weight_planes(codes_kn, bits: int, word: str = "uint32") -> np.ndarray:
    """[K, N] codes -> [bits, words, N] planes for bitserial_qdense."""
    return bitpack.bitplanes(codes_kn, bits, axis=0, word=word)


_POPCOUNT_FEATURES = ("popcnt", "avx512vpopcntdq", "neon")  # x86 POPCNT, AVX-512 VPOPCNTDQ, ARM NEON cnt/vcnt


def choose_word(length: int) -> str:
    """The word type for packing ``length`` bits: least padding, then the one closest to 32 bits. The kernels
    accumulate in int32 lanes, one per output channel: 32-bit words popcount straight into them (VPOPCNTD), where
    64-bit words need their counts narrowed first (VPOPCNTQ + VPMOVQD: 12-25 % slower ResNet-18 3x3 convs)."""
    words = sorted(bitpack.WORDS, key=lambda w: (bitpack.num_words(length, w) * bitpack.word_bits(w),
                                                 abs(bitpack.word_bits(w) - 32)))
    return words[0]


def has_popcount(target) -> bool:
    """Whether an llvm target has a popcount instruction (scalar or SIMD); otherwise use the int8 fallback.
    ``None`` (target not known yet) counts as having one."""
    if target is None:
        return True
    return any(has_feature(target, feature) for feature in _POPCOUNT_FEATURES)


def conv2d_for_target(target, codes_hwio, bits: int, encoding: str = "sawb", word: str = "uint32"):
    """(kernel, weight array, extra attrs) for a low-bit conv on ``target``.

    With popcount: ``bitserial_qconv2d`` and the weight planes.  Without: ``qkernels.qconv2d`` and int8 HWIO
    weights (the code integers; |2c - (2^b - 1)| <= 127 for b <= 7), groups 1.  Both take (data, weights,
    bias, multiplier, shift, input_zero_point=...) and compute the same integers.
    """
    if has_popcount(target):
        return bitserial_qconv2d, conv2d_weight_planes(codes_hwio, bits, word), {
            "weight_bits": bits, "encoding": encoding}
    if bits > 7:
        raise ValueError(f"the int8 fallback holds weights of at most 7 bits, not {bits}")
    ints = weight_integers(codes_hwio, bits, encoding).astype(np.int8)
    return qkernels.qconv2d, ints, {"groups": 1}


def dense_for_target(target, codes_kn, bits: int, encoding: str = "sawb", word: str = "uint32"):
    """As conv2d_for_target, for dense ([K, N] codes): bitserial_qdense or qkernels.qdense."""
    if has_popcount(target):
        return bitserial_qdense, dense_weight_planes(codes_kn, bits, word), {"weight_bits": bits, "encoding": encoding}
    if bits > 7:
        raise ValueError(f"the int8 fallback holds weights of at most 7 bits, not {bits}")
    return qkernels.qdense, weight_integers(codes_kn, bits, encoding).astype(np.int8), {}
