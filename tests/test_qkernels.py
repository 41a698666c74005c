"""The int8 kernels of schedules.qkernels are bit-exact against numpy when built by the real CPU pipeline,
and their default schedules use the integer dot-product instructions (VNNI, sdot, NEON smull)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import qkernels_reference
import tvm
from conftest import free_port, llvm_assembly
from tvm import relax, topi

import targets
from schedules import depthwise_dot, dot_product, qkernels, scheme
from schedules.lowering import lowering_pipeline


def target_of(name: str):
    return targets.tvm_target(targets.resolve(name))


def build(kernel, inputs, consts=(), target="host", **attrs):
    """emit_te(kernel, *inputs, *relax.const(consts), **attrs) as the only op of `main`, compiled for target."""
    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(x.shape, str(x.dtype))) for i, x in enumerate(inputs)]
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit_te(kernel, *params, *[relax.const(c) for c in consts], **attrs,
                           primfunc_name_hint=getattr(kernel, "__name__", "qkernel"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    tvm_target = target_of(target)
    return tvm.compile(bb.get(), tvm_target, relax_pipeline=lowering_pipeline(tvm_target))


def run(ex, *inputs):
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(x) for x in inputs]).numpy()




def random_q(rng, shape, dtype):
    lo, hi = scheme.DTYPE_RANGES[dtype]
    return rng.integers(lo, hi + 1, size=shape).astype(dtype)


def channel_params(rng, channels, depth):
    """bias, multiplier, shift putting the outputs well inside the 8-bit range (not all clamped)."""
    bias = rng.integers(-20000, 20000, size=channels).astype("int32")
    multiplier, shift = scheme.fixed_point_multiplier(rng.uniform(0.5, 2.0, size=channels) / (400 * np.sqrt(depth)))
    return bias, multiplier, shift


def conv_case(rng, shape, out_channels, kernel, *, stride=1, padding=None, dilation=1, groups=1, dtype="uint8",
              out_dtype="uint8", zin=7, zout=-3, clamp=None):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    data = random_q(rng, shape, dtype)
    weight = rng.integers(-127, 128, size=(kh, kw, shape[3] // groups, out_channels)).astype("int8")
    consts = (weight, *channel_params(rng, out_channels, kh * kw * shape[3] // groups))
    lo, hi = clamp or scheme.DTYPE_RANGES[out_dtype]
    attrs = dict(high_word=scheme.uses_high_word(consts[3]), strides=(stride, stride), padding=padding if padding is not None else (kh // 2, kw // 2) * 2,
                 dilation=(dilation, dilation), groups=groups, input_zero_point=zin, output_zero_point=zout,
                 out_min=lo, out_max=hi, out_dtype=out_dtype)
    return data, consts, attrs


def kernel_consts(consts, groups):
    """conv_case's (HWIO weight, bias, multiplier, shift) as qconv2d takes them: a grouped conv's weight per group."""
    weight, *epilogue = consts
    grouped = 1 < groups and weight.shape[2] > 1
    return (qkernels.group_weight(weight, groups) if grouped else weight, *epilogue)


CONVS = {
    "3x3 u8": dict(shape=(1, 12, 12, 32), out_channels=32, kernel=3),
    "3x3 s8 out": dict(shape=(1, 10, 10, 16), out_channels=32, kernel=3, out_dtype="int8", zout=4),
    "3x3 s8 data": dict(shape=(1, 9, 9, 16), out_channels=16, kernel=3, dtype="int8", zin=-5),
    "stride 2 asym pad": dict(shape=(2, 11, 13, 8), out_channels=16, kernel=3, stride=2, padding=(0, 1, 2, 1)),
    "dilation 2": dict(shape=(1, 12, 12, 8), out_channels=16, kernel=3, dilation=2, padding=(2, 2, 2, 2)),
    "1x1": dict(shape=(1, 7, 7, 64), out_channels=48, kernel=1),
    "1x3 no pad": dict(shape=(1, 6, 9, 12), out_channels=24, kernel=(1, 3), padding=(0, 0, 0, 0)),
    "odd in channels": dict(shape=(1, 15, 15, 3), out_channels=16, kernel=3, stride=2),
    "odd out channels": dict(shape=(1, 8, 8, 12), out_channels=13, kernel=3),
    "odd both": dict(shape=(1, 5, 7, 5), out_channels=7, kernel=3, dtype="int8", out_dtype="int8"),
    "clamped (relu6)": dict(shape=(1, 8, 8, 16), out_channels=16, kernel=3, zout=10, clamp=(10, 70)),
    "depthwise": dict(shape=(1, 14, 14, 24), out_channels=24, kernel=3, groups=24),
    "depthwise s8 stride 2": dict(shape=(1, 15, 15, 20), out_channels=20, kernel=3, groups=20, stride=2,
                                  dtype="int8", out_dtype="int8", zin=-11),
    "depthwise 5x5 odd": dict(shape=(1, 9, 9, 7), out_channels=7, kernel=5, groups=7),
    "depthwise multiplier 2": dict(shape=(1, 8, 8, 6), out_channels=12, kernel=3, groups=6),
    "grouped": dict(shape=(1, 8, 8, 16), out_channels=32, kernel=3, groups=4),
    "grouped odd": dict(shape=(1, 7, 7, 9), out_channels=6, kernel=3, groups=3, dtype="int8"),
    # RegNetX (16 channels per group), RegNetY (8), ResNeXt 32x4d (4): each on its dot-product tile
    "grouped 16 per group stride 2": dict(shape=(1, 13, 13, 64), out_channels=64, kernel=3, groups=4, stride=2),
    "grouped 8 per group": dict(shape=(1, 7, 7, 48), out_channels=48, kernel=3, groups=6),
    "grouped 4 per group s8": dict(shape=(1, 6, 6, 32), out_channels=32, kernel=3, groups=8, dtype="int8",
                                   out_dtype="int8"),
}


@pytest.mark.parametrize("case", CONVS, ids=list(CONVS))
def test_qconv2d_matches_numpy(case):
    rng = np.random.default_rng(sorted(CONVS).index(case))
    data, consts, attrs = conv_case(rng, **CONVS[case])
    expected = qkernels_reference.qconv2d(data, *consts, **attrs)
    assert len(np.unique(expected)) > 10, "test data saturates"
    assert attrs["high_word"]  # as realize builds them: shifts 33..62
    ex = build(qkernels.qconv2d, [data], kernel_consts(consts, attrs["groups"]), **attrs)
    np.testing.assert_array_equal(run(ex, data), expected)


@pytest.mark.parametrize("real", [0.3, 0.9])  # shifts 32, 31
def test_qconv2d_with_shifts_below_33_matches_numpy(real):
    """Output scales close to the accumulator's (shift <= 32) take the 64-bit requantize."""
    rng = np.random.default_rng(5)
    data, (weight, bias, _, _), attrs = conv_case(rng, (1, 6, 6, 8), 16, 1, padding=(0, 0, 0, 0))
    weight = (weight // 64).astype("int8")  # small sums, so real multipliers near 1 do not saturate everything
    bias = (bias // 1000).astype("int32")
    multiplier, shift = scheme.fixed_point_multiplier(np.full(16, real))
    attrs = dict(attrs, high_word=scheme.uses_high_word(shift), input_zero_point=128, output_zero_point=128)
    assert not attrs["high_word"]
    consts = (weight, bias, multiplier, shift)
    expected = qkernels_reference.qconv2d(data, *consts, **attrs)
    assert len(np.unique(expected)) > 10, "test data saturates"
    np.testing.assert_array_equal(run(build(qkernels.qconv2d, [data], consts, **attrs), data), expected)


def test_reference_qconv2d_matches_float_convolution():
    """The reference itself, against a float64 direct convolution of (x - zin) (a check of the check)."""
    rng = np.random.default_rng(0)
    data, (weight, bias, multiplier, shift), attrs = conv_case(rng, (1, 6, 7, 4), 6, 3, stride=2, groups=2,
                                                               padding=(1, 0, 1, 2))
    x = np.pad(data.astype(np.float64), [(0, 0), (1, 1), (0, 2), (0, 0)], constant_values=attrs["input_zero_point"])
    acc = np.zeros((1, 3, 4, 6))  # rows (6 + 1 + 1 - 3) // 2 + 1, columns (7 + 0 + 2 - 3) // 2 + 1
    for oy in range(3):
        for ox in range(4):
            for o in range(6):
                g = o // 3
                window = x[0, oy * 2:oy * 2 + 3, ox * 2:ox * 2 + 3, g * 2:g * 2 + 2]
                acc[0, oy, ox, o] = (window * weight[..., o]).sum() + bias[o]
    expected = scheme.saturate(scheme.requantize(acc.astype(np.int64), multiplier, shift).astype(np.int64)
                               + attrs["output_zero_point"], "uint8")
    np.testing.assert_array_equal(qkernels_reference.qconv2d(data, weight, bias, multiplier, shift, **attrs),
                                  expected)


@pytest.mark.parametrize("rows, depth, features, dtype", [(1, 128, 64, "uint8"), (5, 60, 40, "uint8"),
                                                           (3, 33, 17, "int8"), (1, 512, 1000, "uint8"),
                                                           (197, 64, 96, "uint8")])  # ViT's prime token count
def test_qdense_matches_numpy(rows, depth, features, dtype):
    rng = np.random.default_rng(depth)
    data = random_q(rng, (rows, depth), dtype)
    consts = (rng.integers(-127, 128, size=(depth, features)).astype("int8"), *channel_params(rng, features, depth))
    attrs = dict(input_zero_point=9, output_zero_point=-2, out_min=-100, out_max=120, out_dtype="int8",
                 high_word=scheme.uses_high_word(consts[3]))
    expected = qkernels_reference.qdense(data, *consts, **attrs)
    np.testing.assert_array_equal(run(build(qkernels.qdense, [data], consts, **attrs), data), expected)


@pytest.mark.parametrize("shape_a, shape_b, dtype", [((1, 6, 6, 16), (1, 6, 6, 16), "uint8"),
                                                     ((1, 5, 5, 7), (7,), "int8"),
                                                     ((2, 1, 4, 3), (1, 5, 1, 3), "uint8")])
def test_qadd_matches_numpy(shape_a, shape_b, dtype):
    rng = np.random.default_rng(1)
    a, b = random_q(rng, shape_a, dtype), random_q(rng, shape_b, dtype)
    ma, mb, shift = scheme.add_multipliers(0.03, 0.07, 0.05)
    lo, hi = scheme.DTYPE_RANGES[dtype]
    attrs = dict(a_multiplier=ma, b_multiplier=mb, shift=shift, a_zero_point=lo + 100,
                 b_zero_point=lo + 120, output_zero_point=lo + 128, out_min=lo + 5, out_max=hi, out_dtype=dtype)
    expected = qkernels_reference.qadd(a, b, **attrs)
    assert expected.shape == np.broadcast_shapes(shape_a, shape_b)
    np.testing.assert_array_equal(run(build(qkernels.qadd, [a, b], **attrs), a, b), expected)


@pytest.mark.parametrize("shape_a, shape_b, dtype", [((1, 6, 6, 16), (1, 1, 1, 16), "uint8"),  # SE gate
                                                     ((1, 5, 5, 7), (1, 5, 5, 7), "int8")])
def test_qmul_matches_numpy(shape_a, shape_b, dtype):
    rng = np.random.default_rng(3)
    a, b = random_q(rng, shape_a, dtype), random_q(rng, shape_b, dtype)
    multiplier, shift = scheme.fixed_point_multiplier(0.03 * 0.004 / 0.02)
    lo, hi = scheme.DTYPE_RANGES[dtype]
    attrs = dict(multiplier=int(multiplier), shift=int(shift), a_zero_point=lo + 100, b_zero_point=lo,
                 output_zero_point=lo + 128, out_min=lo, out_max=hi - 3, out_dtype=dtype)
    expected = qkernels_reference.qmul(a, b, **attrs)
    assert expected.shape == np.broadcast_shapes(shape_a, shape_b) and len(np.unique(expected)) > 20
    np.testing.assert_array_equal(run(build(qkernels.qmul, [a, b], **attrs), a, b), expected)


@pytest.mark.parametrize("in_dtype, out_dtype", [("uint8", "int8"), ("int8", "uint8")])
def test_qrequantize_matches_numpy(in_dtype, out_dtype):
    rng = np.random.default_rng(2)
    x = random_q(rng, (1, 9, 9, 10), in_dtype)
    multiplier, shift = scheme.fixed_point_multiplier(0.021 / (0.013 * 2**qkernels.QSHIFT))
    attrs = dict(multiplier=int(multiplier), shift=int(shift), input_zero_point=4, output_zero_point=-6,
                 out_min=-128, out_max=127, out_dtype=out_dtype)
    expected = qkernels_reference.qrequantize(x, **attrs)
    np.testing.assert_array_equal(run(build(qkernels.qrequantize, [x], **attrs), x), expected)


@pytest.mark.parametrize("shape, pool, strides, padding, dtype", [
    ((1, 7, 7, 40), (7, 7), (1, 1), (0, 0, 0, 0), "uint8"),  # global average pooling
    ((2, 9, 8, 5), (3, 3), (2, 2), (1, 1, 1, 0), "int8"),
])
def test_qavg_pool2d_matches_numpy(shape, pool, strides, padding, dtype):
    rng = np.random.default_rng(3)
    x = random_q(rng, shape, dtype)
    multiplier, shift = scheme.fixed_point_multiplier(0.02 / (0.015 * pool[0] * pool[1]))
    lo, hi = scheme.DTYPE_RANGES[dtype]
    attrs = dict(pool_size=pool, strides=strides, padding=padding, multiplier=int(multiplier), shift=int(shift),
                 input_zero_point=lo + 125, output_zero_point=lo + 130, out_min=lo, out_max=hi, out_dtype=dtype)
    expected = qkernels_reference.qavg_pool2d(x, **attrs)
    np.testing.assert_array_equal(run(build(qkernels.qavg_pool2d, [x], **attrs), x), expected)


@pytest.mark.parametrize("dtype, dilation", [("uint8", (1, 1)), ("int8", (2, 2))])
def test_qmax_pool2d_matches_numpy(dtype, dilation):
    rng = np.random.default_rng(4)
    x = random_q(rng, (1, 11, 10, 6), dtype)
    attrs = dict(pool_size=(3, 3), strides=(2, 2), padding=(1, 1, 1, 1), dilation=dilation)
    expected = qkernels_reference.qmax_pool2d(x, **attrs)
    np.testing.assert_array_equal(run(build(qkernels.qmax_pool2d, [x], **attrs), x), expected)


def test_conv_fused_with_quantize_and_dequantize():
    """FuseOps puts the dequantize into the conv's PrimFunc (and transpose + quantize in front): still exact."""
    rng = np.random.default_rng(5)
    _, consts, attrs = conv_case(rng, (1, 8, 8, 16), 16, 3, zin=3, zout=5)
    x = rng.uniform(-1, 1, size=(1, 16, 8, 8)).astype("float32")
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            t = bb.emit(relax.op.permute_dims(xv, [0, 2, 3, 1]))
            q = bb.emit(relax.op.quantize(t, relax.const(0.01, "float32"), relax.const(3, "int8"), axis=-1,
                                          out_dtype="uint8"))
            y = bb.emit_te(qkernels.qconv2d, q, *[relax.const(c) for c in consts], **attrs,
                           primfunc_name_hint="qconv2d")
            d = bb.emit(relax.op.dequantize(y, relax.const(0.02, "float32"), relax.const(5, "int8"), axis=-1,
                                            out_dtype="float32"))
            out = bb.emit_output(d)
        bb.emit_func_output(out)
    host = target_of("host")
    ex = tvm.compile(bb.get(), host, relax_pipeline=lowering_pipeline(host))
    qx = scheme.quantize(x.transpose(0, 2, 3, 1), scheme.QParams(np.float32(0.01), np.int32(3), "uint8"))
    expected = scheme.dequantize(qkernels_reference.qconv2d(qx, *consts, **attrs),
                                 scheme.QParams(np.float32(0.02), np.int32(5), "uint8"))
    np.testing.assert_array_equal(run(ex, x), expected)
    if _host_has("avx512vnni"):
        assert "vpdpbusd" in llvm_assembly(ex)


def _transposed_qconv2d(x, *consts, **attrs):
    """A producer fused into the conv (as FuseOps may hand it over): NCHW -> NHWC transpose of the data."""
    return qkernels.qconv2d(topi.transpose(x, [0, 2, 3, 1]), *consts, **attrs)


def test_producer_fused_into_conv_is_materialized_and_tensorized():
    rng = np.random.default_rng(6)
    data, consts, attrs = conv_case(rng, (1, 6, 6, 32), 32, 1)
    ex = build(_transposed_qconv2d, [np.ascontiguousarray(data.transpose(0, 3, 1, 2))], consts, **attrs)
    np.testing.assert_array_equal(run(ex, np.ascontiguousarray(data.transpose(0, 3, 1, 2))),
                                  qkernels_reference.qconv2d(data, *consts, **attrs))
    if _host_has("avx512vnni"):
        assert "vpdpbusd" in llvm_assembly(ex)


def _host_has(feature: str) -> bool:
    return bool(tvm.target.codegen.target_has_features(feature, target_of("host")))


# ------------------------------------------------------------------------------------ instruction selection
def _conv_asm(target: str, dtype: str, in_channels=32, out_channels=32, groups=1) -> str:
    rng = np.random.default_rng(7)
    data, consts, attrs = conv_case(rng, (1, 8, 8, in_channels), out_channels, 3, dtype=dtype, groups=groups)
    return llvm_assembly(build(qkernels.qconv2d, [data], kernel_consts(consts, groups), target=target, **attrs))


@pytest.mark.skipif(not _host_has("avx512vnni"), reason="host CPU has no AVX-512 VNNI")
def test_host_conv_uses_vnni_and_pmuldq():
    asm = _conv_asm("host", "uint8")
    assert "vpdpbusd" in asm
    assert "vpmuldq" in asm and "vpmullq" not in asm  # the requantize multiply is 32x32->64


@pytest.mark.skipif(not _host_has("avx512vnni"), reason="host CPU has no AVX-512 VNNI")
def test_host_dense_with_prime_rows_keeps_a_full_register_tile_on_vnni():
    """197 rows (ViT's tokens) have no divisor to tile by: the rows are padded to whole 6-row tiles so the
    tile still tensorizes (a predicated partial tile does not), 6 x 2 accumulators instead of 1 x 2."""
    rng = np.random.default_rng(3)
    data = random_q(rng, (197, 64), "uint8")
    consts = (rng.integers(-127, 128, size=(64, 96)).astype("int8"), *channel_params(rng, 96, 64))
    attrs = dict(input_zero_point=9, output_zero_point=-2, out_min=-128, out_max=127, out_dtype="int8",
                 high_word=scheme.uses_high_word(consts[3]))
    asm = llvm_assembly(build(qkernels.qdense, [data], consts, **attrs))
    assert "vpdpbusd" in asm
    assert dot_product._register_tile(197, 96 // 16, dot_product.dot_intrins(target_of("host"))[0]) == (6, 2)


@pytest.mark.skipif(not _host_has("avx512vnni"), reason="host CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("per_group", [4, 8, 16])
def test_host_grouped_conv_uses_vnni(per_group):
    """A grouped conv (RegNet, ResNeXt) reduces its group's channels with vpdpbusd like a dense one: computed as
    [pixels, groups, channels per group], its input channel does not depend on the output channel."""
    asm = _conv_asm("host", "uint8", in_channels=4 * per_group, out_channels=4 * per_group, groups=4)
    assert "vpdpbusd" in asm


def test_host_depthwise_is_vectorized():
    asm = _conv_asm("host", "uint8", in_channels=32, out_channels=32, groups=32)
    assert re.search(r"\bvpmullw\b|\bvpmaddwd\b|\bvpdpwssd\b", asm)


@pytest.mark.skipif(not _host_has("avx512vnni"), reason="host CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("kernel, stride, shape", [(3, 1, (1, 14, 14, 32)), (3, 2, (1, 15, 15, 48)),
                                                    (5, 1, (1, 9, 9, 16))])
def test_depthwise_with_rows_padded_to_four_runs_on_vnni(kernel, stride, shape):
    """Realize pads a depthwise kernel with zero rows to a multiple of 4 and the input with as many more bottom
    rows (same output): the conv then reduces 4 kernel rows per vpdpbusd, bit-exact."""
    rng = np.random.default_rng(kernel * 10 + stride)
    data, consts, attrs = conv_case(rng, shape, shape[3], kernel, groups=shape[3], stride=stride, zout=5,
                                    clamp=(5, 200))
    expected = qkernels_reference.qconv2d(data, *consts, **attrs)
    weight, *epilogue = consts
    extra = -kernel % depthwise_dot.depthwise_rows(target_of("host"), shape[3], 1, "uint8", kernel)
    assert extra == 4 - kernel % 4
    top, left, bottom, right = attrs["padding"]
    padded = np.concatenate([weight, np.zeros((extra,) + weight.shape[1:], weight.dtype)])
    ex = build(qkernels.qconv2d, [data], (padded, *epilogue), **dict(attrs, padding=(top, left, bottom + extra, right)))
    np.testing.assert_array_equal(run(ex, data), expected)
    assert "vpdpbusd" in llvm_assembly(ex)


@pytest.mark.parametrize("target, channels, dilation, dtype, kernel_rows, rows", [
    ("host", 32, 1, "uint8", 3, None), ("host", 32, 1, "uint8", 7, None), ("host", 24, 1, "uint8", 3, 1),
    ("host", 32, 2, "uint8", 3, 1), ("host", 32, 1, "int8", 3, 1), ("host", 32, 1, "uint8", 1, 1),
    ("rpi5", 32, 1, "int8", 3, 1), ("rpi4", 32, 1, "uint8", 3, 1)])
def test_depthwise_rows_only_where_the_vnni_depthwise_kernel_applies(target, channels, dilation, dtype,
                                                                     kernel_rows, rows):
    if rows is None:
        rows = 4 if _host_has("avx512vnni") else 1
    assert depthwise_dot.depthwise_rows(target_of(target), channels, dilation, dtype, kernel_rows) == rows


def test_rpi5_conv_uses_sdot():
    assert re.search(r"^\s+sdot\s+v", _conv_asm("rpi5", "int8"), re.M)


def test_rpi4_conv_uses_widening_neon_multiplies():
    asm = _conv_asm("rpi4", "int8")
    assert re.search(r"^\s+smull2?\s+v\d+\.8h", asm, re.M)  # 8x8->16-bit products of the dot product
    assert re.search(r"^\s+smull2?\s+v\d+\.2d", asm, re.M)  # 32x32->64-bit requantize multiply ...
    assert re.search(r"^\s+uzp2\s+v\d+\.4s", asm, re.M)  # ... of which the high words are kept
    assert not re.search(r"^\s+(mul|madd|smulh)\s+x\d+, x\d+, x\d+", asm, re.M)  # no scalar 64-bit multiply


@pytest.mark.parametrize("target", ["host", "rpi5", "rpi4"])
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_dot_product_tiles_allocate_nothing(target, dtype):
    """A tensor intrinsic with a named intermediate gets a one-element local buffer, which TVM allocates with
    TVMBackendAllocWorkspace in every register tile (a 1x1 int8 conv spent a quarter of its time there)."""
    from edgeq.build import _modules

    rng = np.random.default_rng(3)
    data, consts, attrs = conv_case(rng, (1, 28, 28, 32), 64, 1, dtype=dtype, padding=(0, 0, 0, 0))
    ex = build(qkernels.qconv2d, [data], consts, target=target, **attrs)
    ir = "\n".join(m.inspect_source("ll") for m in _modules(ex.mod) if m.kind == "llvm")
    lambdas = [f for f in ir.split("\ndefine ")[1:] if f.split("(", 1)[0].endswith("parallel_lambda")]
    assert lambdas
    for body in lambdas:
        assert "AllocWorkspace" not in body, body.split("(", 1)[0]


@pytest.mark.skipif(not _host_has("avx2"), reason="host CPU has no AVX2")
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_avx2_build_uses_pmaddwd_and_matches_numpy(dtype):
    """x86 without VNNI (the x86-avx2 preset, runnable here): vpmaddwd on 8 lanes, exact."""
    rng = np.random.default_rng(8)
    data, consts, attrs = conv_case(rng, (1, 9, 9, 16), 24, 3, dtype=dtype)
    ex = build(qkernels.qconv2d, [data], consts, target="x86-avx2", **attrs)
    assert re.search(r"\bvpmaddwd\b", llvm_assembly(ex))
    np.testing.assert_array_equal(run(ex, data), qkernels_reference.qconv2d(data, *consts, **attrs))


# ------------------------------------------------------------------------------------ emulated Raspberry Pis
@pytest.mark.slow
@pytest.mark.parametrize("board", ["rpi5", "rpi4"])
def test_arm_kernels_match_numpy_on_emulated_board(board):
    """sdot (rpi5) and NEON smull (rpi4) code run under qemu with the board's CPU, through TVM RPC."""
    import tempfile
    from pathlib import Path

    from conftest import require_tool
    from tvm import rpc
    from tvm.support import cc

    from edgeq.deploy.emulate import emulate, stop

    require_tool("aarch64-linux-gnu-gcc")
    require_tool("qemu-aarch64-static")
    rng = np.random.default_rng(9)
    cases = []
    for shape, out_channels, kernel, groups in [((1, 9, 9, 16), 32, 3, 1), ((1, 13, 13, 8), 12, 1, 1),
                                                ((1, 10, 10, 16), 16, 3, 16)]:
        data, consts, attrs = conv_case(rng, shape, out_channels, kernel, groups=groups, dtype="int8", out_dtype="int8")
        dot = "sdot" if board == "rpi5" and groups == 1 else "smull"  # depthwise: widening multiplies
        cases.append((qkernels.qconv2d, data, consts, attrs, qkernels_reference.qconv2d(data, *consts, **attrs), dot))
    data = random_q(rng, (3, 64), "int8")
    consts = (rng.integers(-127, 128, size=(64, 40)).astype("int8"), *channel_params(rng, 40, 64))
    attrs = dict(input_zero_point=1, output_zero_point=2, out_min=-128, out_max=127, out_dtype="int8")
    cases.append((qkernels.qdense, data, consts, attrs, qkernels_reference.qdense(data, *consts, **attrs),
                  "sdot" if board == "rpi5" else "smull"))

    port = free_port()
    try:
        emulate(board, port)
        remote = rpc.connect("127.0.0.1", port, session_timeout=300)
        for i, (kernel, data, consts, attrs, expected, dot) in enumerate(cases):
            ex = build(kernel, [data], consts, target=board, **attrs)
            assert re.search(rf"^\s+{dot}\s+v", llvm_assembly(ex), re.M)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"qkernel_{board}_{i}.so"
                ex.export_library(str(path), fcompile=cc.cross_compiler("aarch64-linux-gnu-gcc"))
                remote.upload(str(path))
                vm = relax.VirtualMachine(remote.load_module(path.name), remote.cpu())
            got = vm["main"](tvm.runtime.tensor(data, remote.cpu())).numpy()
            np.testing.assert_array_equal(got, expected)
    finally:
        stop(port)
