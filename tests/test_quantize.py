"""int8 quantization end to end: annotate (QDQ) -> realize (integer kernels) -> build, checked against ONNX Runtime.

The oracle for every realized op is ONNX Runtime running the very QDQ model edgeq realized: edgeq's integer
requantization rounds once where the float DQ -> op -> Q path rounds once too, so one-op graphs agree within
one quantization step of the output.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tvm

import edgeq
import targets
from conftest import llvm_assembly, ort_outputs
from edgeq.errors import EdgeqError
from relay_passes.quantize import prepare, weights

RNG = np.random.default_rng(7)


def _model(nodes, inits, inputs, output_shape, opset=17):
    graph = helper.make_graph(
        nodes, "q", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _w(*shape, scale=0.3):
    return RNG.standard_normal(shape) * scale


def _conv(x, w, out, b=None, **attrs):
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [out], name=f"conv_{out}", **attrs)


CASES = {
    "conv_bias_relu": (
        [_conv("x", "w", "c", "b", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"], name="relu")],
        {"w": _w(16, 8, 3, 3), "b": _w(16)}, {"x": [1, 8, 10, 10]}, [1, 16, 10, 10]),
    "conv_stride2_relu6": (
        [_conv("x", "w", "c", "b", pads=[1, 1, 1, 1], strides=[2, 2]),
         helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="relu6")],
        {"w": _w(32, 4, 3, 3), "b": _w(32), "lo": 0.0, "hi": 6.0}, {"x": [1, 4, 9, 9]}, [1, 32, 5, 5]),
    "conv_odd_channels_no_bias": (
        [_conv("x", "w", "y", pads=[0, 1, 2, 1])], {"w": _w(5, 3, 3, 3)}, {"x": [1, 3, 7, 6]}, [1, 5, 7, 6]),
    "depthwise": (
        [_conv("x", "w", "y", "b", pads=[1, 1, 1, 1], group=24)], {"w": _w(24, 1, 3, 3), "b": _w(24)},
        {"x": [1, 24, 8, 8]}, [1, 24, 8, 8]),
    "depthwise_vnni_stride2": (  # 32 channels: the 4-row VNNI depthwise kernel on AVX-512 VNNI hosts
        [_conv("x", "w", "y", "b", pads=[1, 1, 1, 1], group=32, strides=[2, 2])], {"w": _w(32, 1, 3, 3), "b": _w(32)},
        {"x": [1, 32, 11, 11]}, [1, 32, 6, 6]),
    "depthwise_vnni_5x5": (
        [_conv("x", "w", "y", pads=[2, 2, 2, 2], group=16)], {"w": _w(16, 1, 5, 5)}, {"x": [1, 16, 9, 9]},
        [1, 16, 9, 9]),
    "grouped_dilated": (
        [_conv("x", "w", "y", "b", pads=[2, 2, 2, 2], group=2, dilations=[2, 2])],
        {"w": _w(8, 4, 3, 3), "b": _w(8)}, {"x": [1, 8, 8, 8]}, [1, 8, 8, 8]),
    "grouped_8_per_group_stride2": (  # RegNetY's group width: the grouped dot-product kernel
        [_conv("x", "w", "y", "b", pads=[1, 1, 1, 1], group=4, strides=[2, 2])],
        {"w": _w(32, 8, 3, 3), "b": _w(32)}, {"x": [1, 32, 9, 9]}, [1, 32, 5, 5]),
    "gemm_transB": (
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="fc")],
        {"w": _w(10, 64), "b": _w(10)}, {"x": [2, 64]}, [2, 10]),
    "matmul": (
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {"w": _w(32, 48)}, {"x": [3, 32]}, [3, 48]),
    "add_relu": (
        [helper.make_node("Add", ["x", "x2"], ["s"], name="add"), helper.make_node("Relu", ["s"], ["y"], name="r")],
        {}, {"x": [1, 8, 6, 6], "x2": [1, 8, 6, 6]}, [1, 8, 6, 6]),
    "mul_broadcast": (  # squeeze-excitation: a feature map times a per-channel gate
        [helper.make_node("Mul", ["x", "x2"], ["y"], name="mul")], {},
        {"x": [1, 8, 6, 6], "x2": [1, 8, 1, 1]}, [1, 8, 6, 6]),
    "concat": (
        [helper.make_node("Concat", ["x", "x2"], ["y"], axis=1, name="cat")], {},
        {"x": [1, 4, 5, 5], "x2": [1, 6, 5, 5]}, [1, 10, 5, 5]),
    "maxpool": (
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                          name="pool")], {}, {"x": [1, 8, 9, 9]}, [1, 8, 5, 5]),
    "maxpool_ceil": (  # GoogLeNet's pools (torch ceil_mode=True): the last window is partial
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1,
                          name="pool")], {}, {"x": [1, 8, 10, 10]}, [1, 8, 5, 5]),
    "maxpool_ceil_2x2_odd": (
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1,
                          name="pool")], {}, {"x": [1, 8, 7, 7]}, [1, 8, 4, 4]),
    "avgpool": (
        [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], name="pool")], {},
        {"x": [1, 8, 8, 8]}, [1, 8, 4, 4]),
    "global_avgpool_flatten": (
        [helper.make_node("GlobalAveragePool", ["x"], ["g"], name="gap"),
         helper.make_node("Flatten", ["g"], ["y"], name="flat")], {}, {"x": [1, 16, 7, 7]}, [1, 16]),
}


def _calibration(model, samples=8):
    """Drawn from their own seed, not RNG: a test's data must not depend on which tests ran before it."""
    rng = np.random.default_rng(1)
    return {i.name: rng.standard_normal((samples, *[d.dim_value for d in i.type.tensor_type.shape.dim][1:]))
            .astype(np.float32) for i in model.graph.input}


def _feeds(model):
    """The first calibration samples: inside the calibrated range, so the output error is the quantization's."""
    calibration = _calibration(model)
    return {i.name: calibration[i.name][:i.type.tensor_type.shape.dim[0].dim_value] for i in model.graph.input}


def _run_host(model, qdq=None):
    import tvm
    from tvm import relax

    from edgeq.compiler import compile_module
    from edgeq.frontend import load_onnx

    imported = load_onnx(model)
    vm = relax.VirtualMachine(compile_module(imported, targets.resolve("host"), qdq), tvm.cpu())

    def run(feeds):
        out = vm["main"](*[tvm.runtime.tensor(feeds[s.name]) for s in imported.inputs])
        return out.numpy()

    return run


def _output_scale(quantized):
    """The step of the model's output: that of the last quantized tensor (Flatten after it keeps its values)."""
    name = f"{quantized.plan.groups[-1].output}.scale"
    return float(numpy_helper.to_array(next(t for t in quantized.qdq.graph.initializer if t.name == name)))


def _realized_calls(qdq) -> list:
    """Every call in the realized module of a QDQ model (uint8 activations)."""
    from tvm import relax

    from edgeq.compiler import realize_onnx

    calls = []
    relax.analysis.post_order_visit(realize_onnx(qdq, "uint8")["main"],
                                    lambda e: calls.append(e) if isinstance(e, relax.Call) else None)
    return calls


def _op_names(calls) -> list[str]:
    return [str(c.op.name) for c in calls if hasattr(c.op, "name")]


def _assert_within_a_concat_step_of_onnxruntime(model, quantized, w_after):
    """A block ending concat -> 1x1 conv (weights ``w_after``) against ORT on the same QDQ model: integer
    requantization may round a concat code one step off ORT's float path (ties); through the conv that is at
    most the concat's step times the largest |w| row sum, plus the output's own step."""
    feeds = _feeds(model)
    ours = _run_host(model, quantized.qdq)(feeds)
    oracle = ort_outputs(quantized.qdq, feeds)[0]
    cat_scale = float(numpy_helper.to_array(next(t for t in quantized.qdq.graph.initializer
                                                 if t.name == "cat.scale")))
    bound = cat_scale * np.abs(w_after).sum(axis=(1, 2, 3)).max() + _output_scale(quantized)
    assert np.abs(ours - oracle).max() <= bound * 1.001


@pytest.mark.parametrize("case", sorted(CASES))
def test_realized_op_matches_onnxruntime_on_the_same_qdq_model(case):
    nodes, inits, inputs, out_shape = CASES[case]
    model = _model(nodes, inits, inputs, out_shape)
    quantized = edgeq.quantize(model, _calibration(model))
    feeds = _feeds(model)
    ours = _run_host(model, quantized.qdq)(feeds)
    oracle = ort_outputs(quantized.qdq, feeds)[0]
    step = _output_scale(quantized)
    assert np.abs(ours - oracle).max() <= step * 1.001, case
    fp32 = ort_outputs(model, feeds)[0]
    assert np.abs(ours - fp32).max() < 0.1 * np.abs(fp32).max() + 2 * step  # and it is still the model


@pytest.mark.parametrize("case", ["maxpool", "maxpool_ceil", "maxpool_ceil_2x2_odd"])
def test_max_pool_is_realized_on_integer_codes(case):
    nodes, inits, inputs, out_shape = CASES[case]
    model = _model(nodes, inits, inputs, out_shape)
    calls = _realized_calls(edgeq.quantize(model, _calibration(model)).qdq)
    ops = _op_names(calls)
    kernels = [str(c.args[0].name_hint) for c in calls if getattr(c.op, "name", "") == "relax.call_tir"]
    assert "relax.nn.max_pool2d" not in ops and any(k.startswith("qmax_pool2d") for k in kernels)


def test_max_pools_and_concat_after_a_float_op_are_quantized_at_their_input():
    """YOLOv8's SPPF block: SiLU -> max pools -> concat -> conv. The pools and the concat read a float tensor
    (SiLU is no quantized op), but their output is quantized for the conv anyway: quantizing SiLU's output
    instead makes them integer (a max and a copy commute with quantization), and SiLU becomes a table."""
    nodes = [_conv("x", "w1", "c", "b1", pads=[1, 1, 1, 1]), helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
             helper.make_node("Mul", ["c", "s"], ["a"], name="silu"),
             helper.make_node("MaxPool", ["a"], ["p1"], kernel_shape=[5, 5], pads=[2, 2, 2, 2], name="pool1"),
             helper.make_node("MaxPool", ["p1"], ["p2"], kernel_shape=[5, 5], pads=[2, 2, 2, 2], name="pool2"),
             helper.make_node("Concat", ["a", "p1", "p2"], ["cat"], axis=1, name="cat"),
             _conv("cat", "w2", "y", "b2")]
    w2 = _w(8, 24, 1, 1)
    model = _model(nodes, {"w1": _w(8, 4, 3, 3), "b1": _w(8), "w2": w2, "b2": _w(8)}, {"x": [1, 4, 8, 8]},
                   [1, 8, 8, 8])
    quantized = edgeq.quantize(model, _calibration(model))
    assert {"pool1", "pool2", "cat"} <= {g.node for g in quantized.plan.groups}, quantized.plan.skipped
    assert "silu" not in quantized.plan.skipped and "silu" not in {g.node for g in quantized.plan.groups}  # a table
    ops = _op_names(_realized_calls(quantized.qdq))
    assert not {"relax.nn.max_pool2d", "relax.sigmoid"} & set(ops) and ops.count("relax.dequantize") == 1, ops
    _assert_within_a_concat_step_of_onnxruntime(model, quantized, w2)


def test_split_after_a_float_op_is_realized_on_integer_codes():
    """YOLOv8's C2f block: SiLU -> Split -> a conv on one part, then a concat of the parts and the conv's output
    -> conv. The Split is quantized at its input (SiLU becomes a table) and splits the integer tensor along
    channels (NHWC), so neither the split nor SiLU runs in float."""
    nodes = [_conv("x", "w1", "c", "b1"), helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
             helper.make_node("Mul", ["c", "s"], ["a"], name="silu"),
             helper.make_node("Split", ["a"], ["a0", "a1"], axis=1, name="split"),  # equal halves
             _conv("a1", "w2", "h", "b2", pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["a0", "a1", "h"], ["cat"], axis=1, name="cat"),
             _conv("cat", "w3", "y", "b3")]
    w3 = _w(8, 24, 1, 1)
    model = _model(nodes, {"w1": _w(16, 4, 1, 1), "b1": _w(16), "w2": _w(8, 8, 3, 3), "b2": _w(8), "w3": w3,
                           "b3": _w(8)}, {"x": [1, 4, 8, 8]}, [1, 8, 8, 8])
    quantized = edgeq.quantize(model, _calibration(model))
    assert {"split", "cat"} <= {g.node for g in quantized.plan.groups}, quantized.plan.skipped
    calls = _realized_calls(quantized.qdq)
    ops = _op_names(calls)
    splits = [c for c in calls if getattr(c.op, "name", "") == "relax.split"]
    assert "relax.sigmoid" not in ops and ops.count("relax.dequantize") == 1, ops
    assert [str(c.args[0].ty.dtype) for c in splits] == ["uint8"] and int(splits[0].attrs.axis) == 3
    _assert_within_a_concat_step_of_onnxruntime(model, quantized, w3)


def test_realized_graph_is_integer_end_to_end():
    """A conv -> relu -> pool -> conv -> add -> gap -> gemm chain has no float op between quantize and dequantize."""
    from tvm import relax

    from edgeq.compiler import realize_onnx

    model = _model([
        _conv("x", "w1", "c1", "b1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("MaxPool", ["r1"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        _conv("p", "w2", "c2", "b2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "p"], ["a"], name="add"), helper.make_node("Relu", ["a"], ["r2"], name="r2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1, name="fc")],
        {"w1": _w(16, 4, 3, 3), "b1": _w(16), "w2": _w(16, 16, 3, 3, scale=0.1), "b2": _w(16),
         "w3": _w(10, 16), "b3": _w(10)}, {"x": [1, 4, 8, 8]}, [1, 10])
    quantized = edgeq.quantize(model, _calibration(model))
    mod = realize_onnx(quantized.qdq, "uint8")
    calls = []
    relax.analysis.post_order_visit(mod["main"], lambda e: calls.append(e) if isinstance(e, relax.Call) else None)
    ops = [str(c.op.name) for c in calls if hasattr(c.op, "name")]
    kernels = sorted(str(c.args[0].name_hint) for c in calls if getattr(c.op, "name", "") == "relax.call_tir")
    assert ops.count("relax.quantize") == 1 and ops.count("relax.dequantize") == 1
    assert not {"relax.nn.conv2d", "relax.matmul", "relax.add", "relax.nn.max_pool2d", "relax.mean"} & set(ops)
    assert sorted(k.rstrip("0123456789") for k in kernels) == sorted(
        ["qconv2d", "qconv2d", "qmax_pool2d", "qadd", "qavg_pool2d", "qdense"])
    feeds = _feeds(model)
    ours = _run_host(model, quantized.qdq)(feeds)
    fp32 = _run_host(model)(feeds)
    sqnr = 10 * np.log10(np.sum(fp32**2) / np.sum((fp32 - ours) ** 2))
    assert sqnr > 25, sqnr


def test_exclude_keeps_layers_float():
    nodes, inits, inputs, out_shape = CASES["conv_bias_relu"]
    model = _model(nodes, inits, inputs, out_shape)
    quantized = edgeq.quantize(model, _calibration(model), exclude=("first",))
    assert quantized.plan.groups == []
    assert quantized.plan.skipped == {"conv_c": "excluded by policy", "relu": "its input is not quantized"}
    quantized = edgeq.quantize(model, _calibration(model), exclude=("Conv",))
    assert "conv_c" in quantized.plan.skipped


def test_per_tensor_weights():
    nodes, inits, inputs, out_shape = CASES["conv_bias_relu"]
    model = _model(nodes, inits, inputs, out_shape)
    quantized = edgeq.quantize(model, _calibration(model), per_channel=False)
    scale = numpy_helper.to_array(next(t for t in quantized.qdq.graph.initializer if t.name == "conv_c.weight.scale"))
    assert scale.shape == ()


def test_batchnorm_is_folded_exactly():
    model = _model([_conv("x", "w", "c", "b", pads=[1, 1, 1, 1]),
                    helper.make_node("BatchNormalization", ["c", "g", "beta", "m", "v"], ["y"], name="bn")],
                   {"w": _w(8, 4, 3, 3), "b": _w(8), "g": 1 + _w(8, scale=0.1), "beta": _w(8),
                    "m": _w(8), "v": 1 + np.abs(_w(8))}, {"x": [1, 4, 6, 6]}, [1, 8, 6, 6])
    folded = prepare.fold_batch_norm(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    feeds = _feeds(model)
    np.testing.assert_allclose(ort_outputs(folded, feeds)[0], ort_outputs(model, feeds)[0], rtol=1e-4, atol=1e-5)


def test_extracted_weights_are_found_again_transposed():
    w = RNG.integers(-127, 128, (6, 5)).astype(np.int8)
    scale = np.linspace(0.01, 0.02, 6).astype(np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
         helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
        [numpy_helper.from_array(w, "wq"), numpy_helper.from_array(scale, "ws"),
         numpy_helper.from_array(np.zeros(6, np.int8), "wz")]), opset_imports=[helper.make_opsetid("", 17)])
    float_model, table = weights.extract_weights(model)
    assert [n.op_type for n in float_model.graph.node] == ["Gemm"]
    real = numpy_helper.to_array(next(t for t in float_model.graph.initializer if t.name == "w"))
    transposed = table[weights.weight_key(real.T)]
    assert transposed.axis == 1 and np.array_equal(transposed.values, w.T)


@pytest.mark.parametrize("target", ["host", "rpi4", "rpi3-32", "jetson-orin"])
def test_activation_dtype_follows_the_dot_product(target):
    expected = {"host": "uint8", "rpi4": "int8", "rpi3-32": "int8", "jetson-orin": "uint8"}[target]
    assert targets.resolve(target).activation_dtype == expected


def test_int8_realization_equals_uint8_realization():
    """ARM's int8 activations are the x86 uint8 ones shifted by 128: the same model gives the same reals."""
    nodes, inits, inputs, out_shape = CASES["conv_stride2_relu6"]
    model = _model(nodes, inits, inputs, out_shape)
    quantized = edgeq.quantize(model, _calibration(model))
    import tvm
    from tvm import relax

    from relay_passes import pipeline
    from edgeq.compiler import realize_onnx
    from schedules.lowering import lowering_pipeline

    feeds = _feeds(model)
    target = targets.tvm_target(targets.resolve("host"))
    results = []
    for dtype in ("uint8", "int8"):
        mod = pipeline.optimize(realize_onnx(quantized.qdq, dtype))
        vm = relax.VirtualMachine(tvm.compile(mod, target, relax_pipeline=lowering_pipeline(target)), tvm.cpu())
        results.append(vm["main"](tvm.runtime.tensor(feeds["x"])).numpy())
    np.testing.assert_array_equal(results[0], results[1])


# --- calibration data errors -------------------------------------------------------------------------------

def _simple():
    nodes, inits, inputs, out_shape = CASES["conv_bias_relu"]
    return _model(nodes, inits, inputs, out_shape)


@pytest.mark.parametrize("data, message", [
    ({"x": np.zeros((4, 8, 9, 10), np.float32)}, "calibration input 'x' has shape [4, 8, 9, 10]; the model expects"),
    ({"image": np.zeros((4, 8, 10, 10), np.float32)}, "no array for input(s) x: float32[1x8x10x10]"),
    ({"x": np.zeros((0, 8, 10, 10), np.float32)}, "the calibration set is empty"),
    ([], "the calibration set is empty"),
    ({"x": np.zeros((2, 8, 10, 10), np.complex64)}, "has dtype complex64"),
])
def test_bad_calibration_data_is_refused_clearly(data, message):
    with pytest.raises(EdgeqError) as err:
        edgeq.quantize(_simple(), data)
    assert message in str(err.value)


def test_calibration_from_a_directory_of_batches(tmp_path):
    for i in range(3):
        np.save(tmp_path / f"batch{i}.npy", RNG.standard_normal((2, 8, 10, 10)).astype(np.float32))
    quantized = edgeq.quantize(_simple(), tmp_path)
    assert set(quantized.ranges) == {"x", "y"}


def test_unknown_method_and_quantized_input_are_refused():
    with pytest.raises(EdgeqError, match="unknown calibration method 'kl'"):
        edgeq.quantize(_simple(), _calibration(_simple()), method="kl")
    quantized = edgeq.quantize(_simple(), _calibration(_simple()))
    with pytest.raises(EdgeqError, match="already quantized"):
        edgeq.quantize(quantized.qdq, _calibration(_simple()))


# --- models quantized by ONNX Runtime -----------------------------------------------------------------------

def _ort_quantized(model, tmp_path, quant_format):
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            data = _calibration(model)
            self.batches = iter([{k: v[i:i + 1] for k, v in data.items()} for i in range(8)])

        def get_next(self):
            return next(self.batches, None)

    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(model, src)
    quantize_static(str(src), str(dst), Reader(), quant_format=quant_format, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(dst)


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_models_quantized_by_onnxruntime_build_to_integer_kernels(fmt, tmp_path):
    from onnxruntime.quantization import QuantFormat

    nodes, inits, inputs, out_shape = CASES["conv_bias_relu"]
    model = _model(nodes, inits, inputs, out_shape)
    quantized = _ort_quantized(model, tmp_path, getattr(QuantFormat, fmt))
    feeds = _feeds(model)
    artifact = edgeq.build(quantized, "host", tmp_path / "out")
    assert artifact.manifest["quantization"]["mode"] == "int8"
    ours = artifact.run(feeds)["y"]
    oracle = ort_outputs(quantized, feeds)[0]
    step = float(np.min(np.diff(np.unique(oracle)))) if np.unique(oracle).size > 1 else 1.0
    assert np.abs(ours - oracle).max() <= step * 1.001


# --- the bundled model's int8 code uses each board's dot product -----------------------------------------

@pytest.mark.parametrize("preset, instruction, absent", [
    ("host", "the host's dot product", None),
    ("rpi5", r"\ssdot\s+v", None),
    ("rpi4", r"\ssmull2?\s+v", r"\ssdot\s"),
])
def test_int8_digits_model_uses_the_boards_dot_product(preset, instruction, absent):
    import re

    from edgeq.compiler import compile_module
    from edgeq.demo import DIGITS_CALIB, DIGITS_MODEL
    from edgeq.frontend import load_onnx

    imported = load_onnx(DIGITS_MODEL, {"image": (1, 1, 8, 8)})
    quantized = edgeq.quantize(imported, DIGITS_CALIB)
    executable = compile_module(imported, targets.resolve(preset), quantized.qdq)
    asm = llvm_assembly(executable)
    if preset == "host":  # VNNI's vpdpbusd, else the 16-bit multiply-add the AVX2 / AVX-512BW kernels use
        vnni = tvm.target.codegen.target_has_features("avx512vnni", targets.tvm_target(targets.resolve("host")))
        instruction = r"vpdpbusd\s" if vnni else r"vpmaddwd\s"
    assert re.search(instruction, asm)
    assert absent is None or not re.search(absent, asm)


def test_calibration_keeps_symbolic_intermediate_dims():
    """Exporters and onnxslim leave intermediate shapes symbolic (``unk__12``) where they could not resolve them
    (torchvision Swin-T before the folding's second round): a calibration tap on such a tensor keeps its dims
    symbolic; writing them as 0 contradicted inference ("Incompatible dimensions") and stopped calibration."""
    from edgeq.calibration import with_outputs

    model = _model([_conv("x", "w", "c", "b", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"], name="relu")],
                   {"w": _w(16, 8, 3, 3), "b": _w(16)}, {"x": [1, 8, 10, 10]}, [1, 16, 10, 10])
    model.graph.value_info.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, ["unk__1", 16, "unk__2", 10]))
    tapped = with_outputs(model, ["c"])
    tap = next(o for o in tapped.graph.output if o.name == "c")
    assert [d.dim_param or d.dim_value for d in tap.type.tensor_type.shape.dim] == ["unk__1", 16, "unk__2", 10]
    onnx.shape_inference.infer_shapes(tapped, check_type=True, strict_mode=True)  # raised with the dims as 0
    feeds = _feeds(model)
    y, c = ort_outputs(tapped, feeds)  # the tap is the conv's output, the model's output unchanged
    np.testing.assert_array_equal(y, ort_outputs(model, feeds)[0])
    np.testing.assert_array_equal(np.maximum(c, 0), y)


def test_bias_much_larger_than_the_accumulator_step_is_kept():
    """A conv fed by near-zero activations with an ordinary bias (a detection head of a freshly initialized
    YOLOv8n: inputs ~1e-10, bias -8.8): bias / (s_x * s_w) is ~1e19 steps, beyond int32. The weight scale grows
    until it fits, so the output is the bias (within a step), not an overflowed accumulator."""
    model = _model([_conv("x", "w", "y", "b")], {"w": _w(8, 4, 1, 1), "b": np.linspace(-9, 9, 8)},
                   {"x": [1, 4, 5, 5]}, [1, 8, 5, 5])
    calibration = {"x": (_calibration(model)["x"] * 1e-10).astype(np.float32)}
    quantized = edgeq.quantize(model, calibration)
    feeds = {"x": calibration["x"][:1]}
    ours = _run_host(model, quantized.qdq)(feeds)
    step = _output_scale(quantized)
    assert np.abs(ours - ort_outputs(model, feeds)[0]).max() <= step
    assert np.abs(ours - ort_outputs(quantized.qdq, feeds)[0]).max() <= step * 1.001
