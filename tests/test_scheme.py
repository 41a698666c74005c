"""Property tests of the integer arithmetic in scheme.py against its formulas and against ONNX's operators."""

from __future__ import annotations

import functools
from fractions import Fraction

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from schedules import scheme
from schedules.scheme import QParams

DTYPES = ["uint8", "int8"]
INT32 = (-(2**31), 2**31 - 1)

# magnitudes from 1e-6 to 1e4, or exactly 0 (subnormal ranges are out of scope: their scales lose bits)
bounds = st.one_of(st.just(0.0), st.floats(1e-6, 1e4)).flatmap(lambda v: st.sampled_from([v, -v]))
weights_element = st.floats(-1e3, 1e3, width=32).map(lambda v: v if abs(v) > 1e-20 else 0.0)


def float32_arrays(shape, bound):
    return hnp.arrays(np.float32, shape, elements=st.floats(-bound, bound, width=32))


# ------------------------------------------------------------------------------------------ activation_qparams
@settings(max_examples=200, deadline=None)
@given(lo=bounds, hi=bounds, dtype=st.sampled_from(DTYPES), fractions=hnp.arrays(np.float64, 64,
                                                                                  elements=st.floats(0, 1)))
def test_activation_qparams(lo, hi, dtype, fractions):
    lo, hi = min(lo, hi), max(lo, hi)
    qp = scheme.activation_qparams(lo, hi, dtype)
    qmin, qmax = scheme.DTYPE_RANGES[dtype]
    scale = float(qp.scale)
    assert qp.zero_point.dtype == np.int32 and qmin <= int(qp.zero_point) <= qmax
    assert np.isfinite(scale) and scale > 0 and qp.scale.dtype == np.float32
    # real 0.0 is a grid point: padding and ReLU zeros are exact
    zero = scheme.quantize(np.zeros(1, np.float32), qp)
    assert zero.dtype == np.dtype(dtype) and int(zero[0]) == int(qp.zero_point)
    assert scheme.dequantize(zero, qp)[0] == 0.0
    # every x of the range (widened to include 0) round-trips within half a step; float32 rounding of the
    # scale, of x / scale and of the product adds a few 2^-24 relative, i.e. far below 1e-4 steps
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    x = (lo + fractions * (hi - lo)).astype(np.float32)
    x = np.clip(x, np.float32(lo), np.float32(hi))
    error = np.abs(scheme.dequantize(scheme.quantize(x, qp), qp).astype(np.float64) - x)
    assert error.max() <= scale * (0.5 + 1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_qparams_constant_zero(dtype):
    qp = scheme.activation_qparams(0.0, 0.0, dtype)
    assert float(qp.scale) == 1.0 and int(qp.zero_point) == scheme.DTYPE_RANGES[dtype][0]
    tiny = scheme.activation_qparams(-1e-45, 1e-45, dtype)  # the float32 scale underflows to 0: replaced by 1
    assert float(tiny.scale) == 1.0


def test_activation_qparams_nudges_the_min():
    """[-1, 7] on uint8: scale 8/255, zero point round(31.875) = 32, so the grid is shifted by 1/8 step."""
    qp = scheme.activation_qparams(-1.0, 7.0, "uint8")
    assert float(qp.scale) == np.float32(8 / 255) and int(qp.zero_point) == 32


# ------------------------------------------------------------------------------------------ weights
@settings(max_examples=100, deadline=None)
@given(weight=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=4, max_side=6), elements=weights_element),
       per_channel=st.booleans())
def test_weight_qparams(weight, per_channel):
    axis = 0 if per_channel else None
    qp = scheme.weight_qparams(weight, axis)
    q = scheme.quantize_weight(weight, qp)
    assert q.dtype == np.int8 and q.min(initial=0) >= -127 and q.max(initial=0) <= 127
    assert qp.dtype == "int8" and not np.any(qp.zero_point) and qp.axis == axis
    assert qp.scale.shape == ((weight.shape[0],) if per_channel else ())
    # each channel's largest |w| maps to +-127 (and an all-zero channel to 0)
    slices = weight.reshape(weight.shape[0], -1) if per_channel else weight.reshape(1, -1)
    qslices = q.reshape(slices.shape)
    for w, qs in zip(slices, qslices):
        if w.size and np.abs(w).max() > 0:
            k = np.argmax(np.abs(w))
            assert qs[k] == np.sign(w[k]) * 127
    scale = np.broadcast_to(qp.scale.reshape((-1,) + (1,) * (weight.ndim - 1)) if per_channel else qp.scale,
                            weight.shape)
    error = np.abs(scheme.dequantize(q, qp).astype(np.float64) - weight)
    assert np.all(error <= scale * (0.5 + 1e-4))


def test_weight_qparams_per_channel_axis():
    weight = np.array([[1.0, -2.0], [0.5, 0.25], [0.0, 0.0]], np.float32)
    qp = scheme.weight_qparams(weight, 0)
    np.testing.assert_array_equal(qp.scale, np.float32([2 / 127, 0.5 / 127, 1.0]))
    np.testing.assert_array_equal(scheme.quantize_weight(weight, qp), [[64, -127], [127, 64], [0, 0]])
    assert float(scheme.weight_qparams(weight, None).scale) == np.float32(2 / 127)
    assert scheme.quantize_weight(np.float32([-5.0, 5.0]), scheme.weight_qparams([1.0])).tolist() == [-127, 127]


# ------------------------------------------------------------------------------------------ fixed point
@settings(max_examples=300, deadline=None)
@given(real=st.floats(1e-9, 1e3))
def test_fixed_point_multiplier(real):
    multiplier, shift = (int(v) for v in scheme.fixed_point_multiplier(real))
    assert 2**30 <= multiplier < 2**31 and 1 <= shift <= 62
    # rounding the 31-bit mantissa: relative error at most 2^-31
    assert abs(Fraction(multiplier, 2**shift) - Fraction(real)) <= Fraction(real) * Fraction(1, 2**31)


def test_fixed_point_multiplier_elementwise_and_edges():
    multiplier, shift = scheme.fixed_point_multiplier([0.5, 1.0, 0.75, 2.0**-40, 1e-20])
    assert multiplier.dtype == np.int32 and shift.dtype == np.int32
    assert multiplier[:3].tolist() == [2**30, 2**30, 3 * 2**29] and shift[:3].tolist() == [31, 30, 31]
    # below 2^-32 the shift saturates at 62 and M shrinks below 2^30: 2^-40 = 2^22 * 2^-62; 1e-20 -> M = 0
    assert (int(multiplier[3]), int(shift[3])) == (2**22, 62)
    assert (int(multiplier[4]), int(shift[4])) == (0, 62)
    assert int(scheme.fixed_point_multiplier(1 - 2.0**-40)[0]) == 2**30  # mantissa rounds up to 1: M = 2^30
    for bad in (0.0, -1.0, 2.0**30, 2.0**30 - 0.125):  # the last would need shift 0
        with pytest.raises(ValueError, match="out of range"):
            scheme.fixed_point_multiplier(bad)


def _reference_requantize(acc: int, multiplier: int, shift: int) -> int:
    """floor(acc * M / 2^s + 1/2) in Python integers (>> floors)."""
    return (acc * multiplier + (1 << (shift - 1))) >> shift


@settings(max_examples=300, deadline=None)
@given(acc=st.integers(*INT32), multiplier=st.integers(2**30, 2**31 - 1), shift=st.integers(1, 62))
def test_requantize_is_the_formula(acc, multiplier, shift):
    expected = _reference_requantize(acc, multiplier, shift)
    got = int(scheme.requantize(np.int32(acc), np.int32(multiplier), np.int32(shift)))
    if INT32[0] <= expected <= INT32[1]:  # always so for shift >= 31, i.e. real multipliers below 1
        assert got == expected
    else:  # the int64 -> int32 cast wraps, exactly as the TVM kernels' cast: callers keep |acc * real| < 2^31
        assert got == (expected + 2**31) % 2**32 - 2**31


@settings(max_examples=50, deadline=None)
@given(acc=hnp.arrays(np.int32, (5, 4), elements=st.integers(*INT32)),
       multiplier=hnp.arrays(np.int32, 4, elements=st.integers(2**30, 2**31 - 1)),
       shift=hnp.arrays(np.int32, 4, elements=st.integers(31, 62)))
def test_requantize_per_channel_broadcast(acc, multiplier, shift):
    out = scheme.requantize(acc, multiplier, shift)
    assert out.dtype == np.int32 and out.shape == acc.shape
    for (i, c), value in np.ndenumerate(out):
        assert value == _reference_requantize(int(acc[i, c]), int(multiplier[c]), int(shift[c]))


@settings(max_examples=300, deadline=None)
@given(acc=st.integers(*INT32), real=st.floats(1e-9, 1e3))
def test_requantize_approximates_the_real_product(acc, real):
    exact = Fraction(acc) * Fraction(real)
    assume(abs(exact) < 2**31 - 1)
    got = int(scheme.requantize(np.int32(acc), *scheme.fixed_point_multiplier(real)))
    assert abs(got - exact) <= Fraction(1, 2) + abs(exact) * Fraction(1, 2**31)


@settings(max_examples=500, deadline=None)
@given(acc=st.integers(*INT32), multiplier=st.integers(2**30, 2**31 - 1), shift=st.integers(33, 62))
def test_requantize_high_word_is_the_formula(acc, multiplier, shift):
    """The 32-bit form the kernels use for shifts 33..62 equals the formula exactly (no wrap: |result| < 2^30)."""
    got = scheme.requantize_high_word(np.int32(acc), np.int32(multiplier), np.int32(shift))
    assert got.dtype == np.int32 and int(got) == _reference_requantize(acc, multiplier, shift)


def test_requantize_high_word_edges_and_when_it_applies():
    acc = np.array([2**31 - 1, -2**31, 0, 1, -1], np.int32)
    for shift in (33, 47, 62):
        for multiplier in (2**30, 2**31 - 1):
            assert (scheme.requantize_high_word(acc, np.int32(multiplier), np.int32(shift)).tolist()
                    == [_reference_requantize(int(a), multiplier, shift) for a in acc])
    assert scheme.uses_high_word(np.array([33, 40, 62])) and not scheme.uses_high_word(np.array([32, 40]))


def test_requantize_ties_round_towards_plus_infinity():
    """M = 2^30, s = 31 is the multiplier 1/2: acc/2 lands on exact ties, which round up (not to even)."""
    acc = np.array([1, -1, 3, -3, 5, -5, 4], np.int32)
    assert scheme.requantize(acc, 2**30, 31).tolist() == [1, 0, 2, -1, 3, -2, 2]  # 0.5 -0.5 1.5 -1.5 2.5 -2.5 2


@settings(max_examples=300, deadline=None)
@given(qa=st.integers(-255, 255), qb=st.integers(-255, 255), scale_a=st.floats(1e-4, 1.0),
       scale_b=st.floats(1e-4, 1.0), scale_out=st.floats(1e-3, 1.0))
def test_quantized_add_rounds_the_exact_sum_once(qa, qb, scale_a, scale_b, scale_out):
    """(qa - za) and (qb - zb) at their scales, added and expressed in output steps: one rounding of the real
    sum, as a float add followed by quantize gives (up to the multipliers' 2^-31 relative error at ties)."""
    ma, mb, shift = scheme.add_multipliers(scale_a, scale_b, scale_out)
    assert max(abs(ma), abs(mb)) < 2**53  # times an 8-bit difference: fits int64
    exact = (Fraction(qa) * Fraction(scale_a) + Fraction(qb) * Fraction(scale_b)) / Fraction(scale_out)
    got = (qa * ma + qb * mb + (1 << (shift - 1))) >> shift  # qadd's arithmetic (python ints: no overflow)
    assert abs(got - exact) <= Fraction(1, 2) + (abs(qa) + abs(qb)) * Fraction(1, 2**20)


# ------------------------------------------------------------------------------------------ saturate, clamps
def test_saturate():
    values = np.array([-1000, -129, -128, -5, 0, 7, 127, 128, 255, 256, 70000], np.int32)
    assert scheme.saturate(values, "int8").tolist() == [-128, -128, -128, -5, 0, 7, 127, 127, 127, 127, 127]
    assert scheme.saturate(values, "uint8").tolist() == [0, 0, 0, 0, 0, 7, 127, 128, 255, 255, 255]
    assert scheme.saturate(values, "uint8", 10, 200).tolist() == [10, 10, 10, 10, 10, 10, 127, 128, 200, 200, 200]
    assert scheme.saturate(values, "int8", -300, 300).dtype == np.int8  # bounds past the dtype: the dtype's
    assert scheme.saturate(values, "int8", -300, 300).tolist() == scheme.saturate(values, "int8").tolist()


@settings(max_examples=200, deadline=None)
@given(lo=st.floats(-10, 0), hi=st.floats(0.01, 20), dtype=st.sampled_from(DTYPES))
def test_activation_clamp(lo, hi, dtype):
    qp = scheme.activation_qparams(lo, hi, dtype)
    z, scale = int(qp.zero_point), float(qp.scale)
    assert scheme.activation_clamp(qp, None, None) == (qp.qmin, qp.qmax)
    relu_lo, relu_hi = scheme.activation_clamp(qp, 0.0, None)  # ReLU: clamp at the zero point
    assert (relu_lo, relu_hi) == (z, qp.qmax)
    clip_lo, clip_hi = scheme.activation_clamp(qp, 0.0, 6.0)  # Clip(0, 6) / ReLU6
    assert clip_lo == z and clip_hi == min(qp.qmax, int(np.round(6.0 / scale)) + z)
    if scale * (qp.qmax - z) >= 6.0:  # 6 representable: the bound is the grid point nearest to 6
        assert abs(scale * (clip_hi - z) - 6.0) <= scale / 2 * (1 + 1e-6)


def test_activation_clamp_relu6_example():
    qp = scheme.activation_qparams(-1.0, 7.0, "uint8")  # scale 8/255, zero point 32
    assert scheme.activation_clamp(qp, 0.0, 6.0) == (32, 32 + 191)  # round(6 * 255 / 8) = round(191.25)
    qp = scheme.activation_qparams(0.0, 6.0, "int8")
    assert scheme.activation_clamp(qp, 0.0, 6.0) == (-128, 127)


# ------------------------------------------------------------------------------------------ ONNX agreement
ONNX_TYPES = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8}


@functools.cache
def _qdq_models(dtype: str, channels: int | None):
    """(ReferenceEvaluator, ORT session) of x -> QuantizeLinear -> y, y -> DequantizeLinear -> x2 (opset 19)."""
    attrs = {"axis": 1} if channels else {}
    param_shape = [channels] if channels else []
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["y"], **attrs),
         helper.make_node("DequantizeLinear", ["y", "scale", "zero_point"], ["x2"], **attrs)],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "c", "w"]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, param_shape),
         helper.make_tensor_value_info("zero_point", ONNX_TYPES[dtype], param_shape)],
        [helper.make_tensor_value_info("y", ONNX_TYPES[dtype], ["n", "c", "w"]),
         helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["n", "c", "w"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return ReferenceEvaluator(model), session


def _check_against_onnx(x, qp):
    feeds = {"x": x, "scale": np.asarray(qp.scale, np.float32),
             "zero_point": np.asarray(qp.zero_point).astype(qp.dtype)}
    q = scheme.quantize(x, qp)
    restored = scheme.dequantize(q, qp)
    for runner in _qdq_models(qp.dtype, qp.scale.size if qp.per_channel else None):
        y, x2 = runner.run(None, feeds)
        assert y.dtype == q.dtype
        np.testing.assert_array_equal(y, q)
        np.testing.assert_array_equal(x2, restored)


@settings(max_examples=60, deadline=None)
@given(lo=st.floats(-50, 0), hi=st.floats(0.01, 50), dtype=st.sampled_from(DTYPES),
       x=float32_arrays((3, 40), 80.0))
def test_per_tensor_matches_onnx(lo, hi, dtype, x):
    qp = scheme.activation_qparams(lo, hi, dtype)
    ties = ((np.arange(-140, 140, dtype=np.float32) + 0.5) * qp.scale).astype(np.float32)  # x/scale on .5
    _check_against_onnx(np.concatenate([x.ravel(), ties]).reshape(1, 1, -1), qp)


@settings(max_examples=60, deadline=None)
@given(scale=hnp.arrays(np.float32, 4, elements=st.floats(2**-10, 2, width=32)),
       zero_point=hnp.arrays(np.int32, 4, elements=st.integers(-128, 127)), x=float32_arrays((2, 4, 9), 300.0))
def test_per_axis_int8_matches_onnx(scale, zero_point, x):
    for zp in (zero_point, np.zeros(4, np.int32)):  # general and weight-style (zero point 0)
        qp = QParams(scale, zp, "int8", axis=1)
        ties = (np.arange(-130, 130, dtype=np.float32)[None, None, :] + 0.5) * scale[None, :, None]
        ties = np.broadcast_to(ties, (x.shape[0],) + ties.shape[1:]).astype(np.float32)
        _check_against_onnx(np.concatenate([x, ties], axis=2), qp)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, (6, 3), elements=st.floats(-1, 1, width=32)),
       hnp.arrays(np.float32, 6, elements=st.floats(-100, 100, width=32)),
       st.floats(1e-12, 1.0), st.booleans())
def test_fit_bias_keeps_every_bias_inside_its_int32_share(weight, bias, input_scale, per_channel):
    qp = scheme.weight_qparams(weight, 0 if per_channel else None)
    fitted = scheme.fit_bias(qp, bias, input_scale)
    accumulator_step = np.float64(input_scale) * fitted.scale.astype(np.float64)
    assert np.all(np.abs(np.round(bias / accumulator_step)) <= scheme.BIAS_LIMIT * (1 + 1e-6))
    assert np.all(fitted.scale >= qp.scale)  # only ever coarser,
    fits = np.abs(bias) / (input_scale * qp.scale.astype(np.float64)) <= scheme.BIAS_LIMIT
    if per_channel:  # and only where the bias did not fit
        assert np.array_equal(fitted.scale[fits], qp.scale[fits])
    elif fits.all():
        assert fitted.scale == qp.scale
