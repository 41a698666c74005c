"""Bit-serial (AND + popcount) conv2d / dense: exact against the plain integer numpy reference, compiled by
the real CPU pipeline; popcount instructions in the host and ARM assembly; int8 fallback without popcount."""

from __future__ import annotations

import re

import numpy as np
import pytest
import bitserial_reference
import tvm
from conftest import llvm_assembly, popcount_pattern
from tvm import relax

import targets
from schedules import bitpack, bitserial, scheme
from schedules.lowering import lowering_pipeline


def _target(name):
    if isinstance(name, dict):
        return tvm.target.Target(name)
    return targets.tvm_target(targets.resolve(name))


def build(kernel, data, consts, target="host", **attrs):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(data.shape, str(data.dtype)))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_te(kernel, x, *[relax.const(c) for c in consts], **attrs, primfunc_name_hint="lowbit")
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    tgt = _target(target)
    return tvm.compile(bb.get(), tgt, relax_pipeline=lowering_pipeline(tgt))


def run(ex, data):
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(data)).numpy()


def _codes(rng, bits, shape):
    return rng.integers(0, 2**bits, shape).astype(np.uint8)


CONV_CASES = [
    # (N, H, W, C, O, K, strides, padding, dilation, abits, wbits, word, encoding)
    (1, 7, 7, 3, 5, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2, 2, "uint32", "sawb"),
    (2, 9, 8, 19, 21, 3, (2, 1), (1, 0, 2, 1), (1, 1), 2, 2, "uint32", "sawb"),
    (1, 6, 6, 33, 16, 1, (1, 1), (0, 0, 0, 0), (1, 1), 2, 2, "uint32", "sawb"),
    (1, 10, 10, 70, 9, 3, (2, 2), (1, 1, 1, 1), (2, 2), 2, 2, "uint64", "sawb"),
    (1, 8, 8, 17, 7, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 3, "uint32", "sawb"),
    (1, 5, 6, 40, 12, 2, (1, 2), (0, 1, 1, 0), (1, 1), 4, 4, "uint64", "sawb"),
    (1, 7, 7, 13, 11, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2, 2, "uint32", "unsigned"),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"C{c[3]}O{c[4]}K{c[5]}a{c[9]}w{c[10]}{c[11]}{c[12]}")
def test_conv2d_equals_the_integer_reference(case):
    n, h, w, c, o, k, strides, padding, dilation, abits, wbits, word, encoding = case
    rng = np.random.default_rng(c * 31 + o)
    x, wc = _codes(rng, abits, (n, h, w, c)), _codes(rng, wbits, (k, k, c, o))
    attrs = dict(strides=strides, padding=padding, dilation=dilation, encoding=encoding)
    ex = build(bitserial.bitserial_conv2d, x, [bitserial.conv2d_weight_planes(wc, wbits, word)],
               activation_bits=abits, weight_bits=wbits, **attrs)
    out = run(ex, x)
    ref = bitserial_reference.conv2d_acc(x, wc, weight_bits=wbits, **attrs)
    assert out.dtype == np.int32 and out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)


def test_eight_bit_activations_with_a_zero_point_pad_with_it():
    # w2a8: asymmetric uint8 activations; padding holds the zero point (real 0), the bias the -zp * sum(w) term
    rng = np.random.default_rng(9)
    x, wc = _codes(rng, 8, (1, 6, 6, 10)), _codes(rng, 2, (3, 3, 10, 4))
    bias, multiplier, shift = _epilogue_params(rng, 4, 1 / 500)
    attrs = dict(padding=(1, 1, 1, 1), input_zero_point=77, output_zero_point=5, out_min=0, out_max=255,
                 out_dtype="uint8")
    ex = build(bitserial.bitserial_qconv2d, x, [bitserial.conv2d_weight_planes(wc, 2, "uint64"), bias, multiplier,
                                                shift], activation_bits=8, weight_bits=2, **attrs)
    ref = bitserial_reference.qconv2d(x, wc, bias, multiplier, shift, weight_bits=2, **attrs)
    np.testing.assert_array_equal(run(ex, x), ref)
    padded_with_zero = bitserial_reference.qconv2d(x, wc, bias, multiplier, shift, weight_bits=2,
                                                   **{**attrs, "input_zero_point": 0})
    assert not np.array_equal(ref, padded_with_zero)  # the zero point matters at the border


def test_int8_activations_are_codes_offset_by_128():
    # realize's ARM convention: int8 q = uint8 code - 128, zero point -128; the kernel reads q + 128
    rng = np.random.default_rng(10)
    codes, wc = _codes(rng, 2, (1, 6, 7, 12)), _codes(rng, 2, (3, 3, 12, 5))
    x = (codes.astype(np.int16) - 128).astype(np.int8)
    attrs = dict(padding=(1, 1, 1, 1), input_zero_point=-128)
    ex = build(bitserial.bitserial_conv2d, x, [bitserial.conv2d_weight_planes(wc, 2)], activation_bits=2,
               weight_bits=2, **attrs)
    expected = bitserial_reference.conv2d_acc(codes, wc, weight_bits=2, padding=(1, 1, 1, 1), input_zero_point=0)
    np.testing.assert_array_equal(run(ex, x), expected)
    np.testing.assert_array_equal(bitserial_reference.conv2d_acc(x, wc, weight_bits=2, **attrs), expected)


def test_sawb_reference_is_the_float_conv_of_the_levels():
    # the integers 2c - 3 times alpha / 3 are exactly the SAWB levels {-a, -a/3, a/3, a}
    rng = np.random.default_rng(0)
    x, wc = _codes(rng, 2, (1, 5, 5, 4)), _codes(rng, 2, (3, 3, 4, 2))
    acc = bitserial_reference.conv2d_acc(x, wc, weight_bits=2, padding=(1, 1, 1, 1))
    levels = np.array([-1.0, -1 / 3, 1 / 3, 1.0])[wc]
    padded = np.pad(x.astype(np.float64), [(0, 0), (1, 1), (1, 1), (0, 0)])
    direct = np.zeros((1, 5, 5, 2))
    for y in range(5):
        for xx in range(5):
            direct[0, y, xx] = np.tensordot(padded[0, y:y + 3, xx:xx + 3], levels, axes=3)
    np.testing.assert_allclose(acc / 3.0, direct, atol=1e-9)


def _epilogue_params(rng, channels, acc_scale):
    bias = rng.integers(-50, 50, channels).astype(np.int32)
    pairs = [scheme.fixed_point_multiplier(s) for s in rng.uniform(0.5, 2.0, channels) * acc_scale]
    multiplier = np.array([m for m, _ in pairs], np.int32)
    shift = np.array([s for _, s in pairs], np.int32)
    return bias, multiplier, shift


def test_qconv2d_requantizes_straight_to_two_bit_codes():
    rng = np.random.default_rng(1)
    x, wc = _codes(rng, 2, (1, 8, 8, 24)), _codes(rng, 2, (3, 3, 24, 10))
    bias, multiplier, shift = _epilogue_params(rng, 10, 1 / 40)
    attrs = dict(padding=(1, 1, 1, 1), output_zero_point=0, out_min=0, out_max=3, out_dtype="uint8")
    ex = build(bitserial.bitserial_qconv2d, x, [bitserial.conv2d_weight_planes(wc, 2), bias, multiplier, shift],
               activation_bits=2, weight_bits=2, **attrs)
    out = run(ex, x)
    ref = bitserial_reference.qconv2d(x, wc, bias, multiplier, shift, weight_bits=2, **attrs)
    np.testing.assert_array_equal(out, ref)
    assert set(np.unique(out)) <= {0, 1, 2, 3} and len(np.unique(out)) > 2  # a real 2-bit output, not saturated


@pytest.mark.parametrize("rows,depth,features,abits,wbits,word", [
    (1, 100, 10, 2, 2, "uint32"), (3, 64, 17, 2, 2, "uint64"), (2, 33, 5, 3, 1, "uint32"), (4, 7, 3, 8, 2, "uint32"),
])
def test_dense_equals_the_integer_reference(rows, depth, features, abits, wbits, word):
    rng = np.random.default_rng(depth)
    x, wc = _codes(rng, abits, (rows, depth)), _codes(rng, wbits, (depth, features))
    ex = build(bitserial.bitserial_dense, x, [bitserial.dense_weight_planes(wc, wbits, word)],
               activation_bits=abits, weight_bits=wbits)
    np.testing.assert_array_equal(run(ex, x), bitserial_reference.dense_acc(x, wc, weight_bits=wbits))


def test_qdense_epilogue():
    rng = np.random.default_rng(2)
    x, wc = _codes(rng, 2, (2, 75)), _codes(rng, 2, (75, 10))
    bias, multiplier, shift = _epilogue_params(rng, 10, 1 / 8)
    attrs = dict(output_zero_point=3, out_min=0, out_max=255, out_dtype="uint8")
    ex = build(bitserial.bitserial_qdense, x, [bitserial.dense_weight_planes(wc, 2), bias, multiplier, shift],
               activation_bits=2, weight_bits=2, **attrs)
    ref = bitserial_reference.qdense(x, wc, bias, multiplier, shift, weight_bits=2, **attrs)
    np.testing.assert_array_equal(run(ex, x), ref)


def test_pack_bits_matches_numpy_bitplanes():
    from tvm import te

    rng = np.random.default_rng(3)
    x = _codes(rng, 3, (2, 3, 45))
    placeholder = te.placeholder(x.shape, "uint8", "x")
    packed = bitserial.pack_bits(placeholder, 3, "uint32")
    func = tvm.compile(te.create_prim_func([placeholder, packed]), target="llvm")
    out = tvm.runtime.tensor(np.zeros([int(d) for d in packed.shape], np.uint32))
    func(tvm.runtime.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), bitpack.bitplanes(x, 3, axis=-1, word="uint32"))


# ---------------------------------------------------------------------------------------------- code generation
def _conv_asm(target):
    rng = np.random.default_rng(4)
    x, wc = _codes(rng, 2, (1, 8, 8, 64)), _codes(rng, 2, (3, 3, 64, 32))
    return llvm_assembly(build(bitserial.bitserial_conv2d, x, [bitserial.conv2d_weight_planes(wc, 2)], target,
                               activation_bits=2, weight_bits=2, padding=(1, 1, 1, 1)))


def test_host_assembly_uses_vector_popcount():
    tgt = _target("host")
    asm = _conv_asm("host")
    assert re.search(popcount_pattern(tgt), asm, re.M)


@pytest.mark.parametrize("preset,pattern", [("rpi4", r"^\s+cnt\s+v\d+\.(16b|8b)"),
                                            ("rpi3-32", r"^\s+vcnt\.8\s+[dq]\d+")])
def test_arm_assembly_uses_neon_cnt(preset, pattern):
    assert re.search(pattern, _conv_asm(preset), re.M)


def test_has_popcount_table():
    assert bitserial.has_popcount(_target("rpi4")) and bitserial.has_popcount(_target("rpi3-32"))
    assert bitserial.has_popcount(_target("x86-avx512"))
    assert not bitserial.has_popcount(_target({"kind": "llvm", "mcpu": "x86-64"}))  # baseline x86-64: no POPCNT
    assert not bitserial.has_popcount(_target({"kind": "llvm", "mtriple": "armv7l-linux-gnueabihf",
                                               "mattr": ["-neon"]}))


def test_fallback_without_popcount_uses_the_int8_kernel_and_is_exact():
    baseline = {"kind": "llvm", "mcpu": "x86-64"}  # runs on any x86-64 host
    rng = np.random.default_rng(5)
    x, wc = _codes(rng, 2, (1, 7, 7, 11)), _codes(rng, 2, (3, 3, 11, 6))
    bias, multiplier, shift = _epilogue_params(rng, 6, 1 / 30)
    kernel, weights, extra = bitserial.conv2d_for_target(_target(baseline), wc, 2)
    assert kernel.__name__ == "qconv2d" and weights.dtype == np.int8
    assert set(np.unique(weights)) <= {-3, -1, 1, 3}
    common = dict(input_zero_point=0, output_zero_point=0, out_min=0, out_max=3, out_dtype="uint8")
    ex = build(kernel, x, [weights, bias, multiplier, shift], baseline, strides=(1, 1), padding=(1, 1, 1, 1),
               dilation=(1, 1), **extra, **common)
    assert not re.search(r"popcnt", llvm_assembly(ex))
    ref = bitserial_reference.qconv2d(x, wc, bias, multiplier, shift, weight_bits=2, padding=(1, 1, 1, 1), **common)
    np.testing.assert_array_equal(run(ex, x), ref)
    kernel, planes, extra = bitserial.conv2d_for_target(_target("host"), wc, 2)
    assert kernel is bitserial.bitserial_qconv2d and planes.dtype == np.uint32 and extra["weight_bits"] == 2


def test_bad_operands():
    rng = np.random.default_rng(6)
    x, wc = _codes(rng, 2, (1, 4, 4, 8)), _codes(rng, 2, (3, 3, 9, 2))
    with pytest.raises(ValueError):  # planes built for 9 channels would still fit one word, but bits mismatch
        build(bitserial.bitserial_conv2d, x, [bitserial.conv2d_weight_planes(wc, 2)], activation_bits=2,
              weight_bits=3)
    with pytest.raises(ValueError):
        build(bitserial.bitserial_conv2d, x.astype(np.int32), [bitserial.conv2d_weight_planes(wc, 2)],
              activation_bits=2, weight_bits=2)
