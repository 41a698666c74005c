"""QOperator -> QDQ rewrite: ONNX Runtime's own quantized models keep their results through to_qdq."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from conftest import ort_int8_kernels_exact, ort_outputs
from relay_passes.quantize.qlinear import REWRITES, to_qdq

REWRITTEN = {op_type for _, op_type in REWRITES}


def _value(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _const(rng, name, shape):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _model(nodes, inputs, output_shape, initializers, opset=13):
    graph = helper.make_graph(nodes, "m", [_value(n, s) for n, s in inputs], [_value("y", output_shape)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def fp32_models():
    """name -> (fp32 model, {input: shape}, the QOperator op ONNX Runtime should make of it)."""
    rng = np.random.default_rng(0)
    image = [("x", [2, 3, 9, 9])]
    return {
        "conv3x3_bias_relu": (_model(
            [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")],
            image, [2, 4, 9, 9], [_const(rng, "w", (4, 3, 3, 3)), _const(rng, "b", (4,))]), "QLinearConv"),
        "conv_strided_dilated": (_model(
            [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", strides=[2, 1], dilations=[1, 2],
                              pads=[0, 2, 1, 1])],
            image, [2, 5, 4, 10], [_const(rng, "w", (5, 3, 3, 2)), _const(rng, "b", (5,))]), "QLinearConv"),
        "conv_auto_pad": (_model(
            [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", auto_pad="SAME_UPPER", strides=[2, 2])],
            image, [2, 4, 5, 5], [_const(rng, "w", (4, 3, 3, 3))]), "QLinearConv"),
        "depthwise": (_model(
            [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="dw", pads=[1, 1, 1, 1], group=3)],
            image, [2, 3, 9, 9], [_const(rng, "w", (3, 1, 3, 3)), _const(rng, "b", (3,))]), "QLinearConv"),
        "matmul": (_model(
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
            [("x", [2, 4, 8])], [2, 4, 6], [_const(rng, "w", (8, 6))]), "QLinearMatMul"),
        "add": (_model(
            [helper.make_node("Add", ["x", "z"], ["y"], name="add")],
            [("x", [2, 3, 5]), ("z", [2, 3, 5])], [2, 3, 5], []), "QLinearAdd"),
        "global_average_pool": (_model(  # ONNX Runtime quantizes a pool only after a quantized op
            [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("GlobalAveragePool", ["c"], ["y"], name="gap")],
            image, [2, 4, 1, 1], [_const(rng, "w", (4, 3, 1, 1))]), "QLinearGlobalAveragePool"),
        "gemm": (_model(
            [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1, alpha=0.5)],
            [("x", [2, 8])], [2, 6], [_const(rng, "w", (6, 8)), _const(rng, "b", (6,))]), "QGemm"),
        "chain": (_model(
            [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="dw", pads=[1, 1, 1, 1], group=4),
             helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
             helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["h"], name="fc", transB=1),
             helper.make_node("MatMul", ["h", "wm"], ["y"], name="mm")],
            image, [2, 6], [_const(rng, "w1", (4, 3, 3, 3)), _const(rng, "b1", (4,)), _const(rng, "w2", (4, 1, 3, 3)),
                            _const(rng, "b2", (4,)), _const(rng, "wg", (5, 4)), _const(rng, "bg", (5,)),
                            _const(rng, "wm", (5, 6))]), "QLinearConv"),
    }


def random_inputs(model, seed):
    rng = np.random.default_rng(seed)
    return {v.name: rng.standard_normal([d.dim_value for d in v.type.tensor_type.shape.dim]).astype(np.float32)
            for v in model.graph.input}


class RandomReader(CalibrationDataReader):
    def __init__(self, model, batches=4):
        self.batches = iter([random_inputs(model, seed) for seed in range(batches)])

    def get_next(self):
        return next(self.batches, None)


def qoperator(model, tmp_path, per_channel):
    fp32, quantized = tmp_path / "fp32.onnx", tmp_path / "qop.onnx"
    onnx.save(model, fp32)
    quantize_static(fp32, quantized, RandomReader(model), quant_format=QuantFormat.QOperator, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(quantized)


def session(model, optimize=True):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:  # else ONNX Runtime fuses DQ -> Conv -> Q back into QLinearConv: run the float path
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def qoperator_outputs(model, names, feeds):
    """The QOperator model's ``names`` by the ONNX arithmetic: onnxruntime's own int8 kernels where they are
    exact, else onnx's reference evaluator (conftest.ort_outputs)."""
    if ort_int8_kernels_exact():
        return session(with_outputs(model, names)).run(names, feeds)
    tapped = with_outputs(model, names)
    values = dict(zip([o.name for o in tapped.graph.output], ort_outputs(tapped, feeds)))
    return [values[n] for n in names]


def with_outputs(model, names):
    model = onnx.ModelProto.FromString(model.SerializeToString())
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    return model


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("name", list(fp32_models()))
def test_qoperator_models_keep_their_results(name, per_channel, tmp_path):
    model, op_type = fp32_models()[name]
    quantized = qoperator(model, tmp_path, per_channel)
    assert op_type in {n.op_type for n in quantized.graph.node}
    rewritten = to_qdq(quantized)
    onnx.checker.check_model(rewritten, full_check=True)
    assert not REWRITTEN & {n.op_type for n in rewritten.graph.node}
    assert [(o.domain, o.version) for o in rewritten.opset_import] == [(o.domain, o.version)
                                                                      for o in quantized.opset_import]
    # every quantized tensor of the original (the rewrite keeps the names) within one step, most exactly equal
    integer = [n.output[0] for n in quantized.graph.node if n.op_type in REWRITTEN]
    for seed in range(3):
        feeds = random_inputs(model, 100 + seed)
        expected = qoperator_outputs(quantized, integer, feeds)
        for optimize in (False, True) if ort_int8_kernels_exact() else (False,):  # fused: its int8 kernels
            got = session(with_outputs(rewritten, integer), optimize).run(integer, feeds)
            for tensor, e, g in zip(integer, expected, got):
                assert e.dtype == g.dtype and e.shape == g.shape, tensor
                difference = np.abs(e.astype(np.int32) - g.astype(np.int32))
                assert difference.max() <= 1 and difference.mean() < 0.01, tensor


def test_rewrite_structure(tmp_path):
    model, _ = fp32_models()["conv_strided_dilated"]
    quantized = qoperator(model, tmp_path, per_channel=True)
    (original,) = [n for n in quantized.graph.node if n.op_type == "QLinearConv"]
    rewritten = to_qdq(quantized)
    produced = [n for n in rewritten.graph.node if n.name.startswith(original.name + "/")]
    assert [n.op_type for n in produced] == ["DequantizeLinear"] * 3 + ["Conv", "QuantizeLinear"]
    (conv,) = [n for n in produced if n.op_type == "Conv"]
    assert {a.name: helper.get_attribute_value(a) for a in conv.attribute} == \
        {a.name: helper.get_attribute_value(a) for a in original.attribute}
    dq_x, dq_w, dq_b = produced[:3]
    assert list(dq_x.input) == list(original.input[:3]) and list(dq_w.input) == list(original.input[3:6])
    assert helper.get_attribute_value(dq_w.attribute[0]) == 0 and dq_w.attribute[0].name == "axis"
    assert dq_b.input[0] == original.input[8] and helper.get_attribute_value(dq_b.attribute[0]) == 0
    initializers = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    np.testing.assert_array_equal(initializers[dq_b.input[1]],
                                  initializers[original.input[1]] * initializers[original.input[4]])
    assert initializers[dq_b.input[2]].dtype == np.int32 and not initializers[dq_b.input[2]].any()
    assert produced[-1].output[0] == original.output[0]
    assert list(produced[-1].input[1:]) == list(original.input[6:8])


def test_model_without_qlinear_ops_is_unchanged():
    for model, _ in fp32_models().values():
        assert to_qdq(model).SerializeToString() == model.SerializeToString()


def _qlinear_conv_model(x_scale, w_scale, opset=13):
    rng = np.random.default_rng(1)
    weight = rng.integers(-127, 128, (4, 3, 3, 3), dtype=np.int8)
    initializers = [
        numpy_helper.from_array(np.asarray(x_scale, np.float32), "x_scale"),
        numpy_helper.from_array(np.asarray(128, np.uint8), "x_zero_point"),
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.asarray(w_scale, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(np.shape(w_scale), np.int8), "w_zero_point"),
        numpy_helper.from_array(np.asarray(0.5, np.float32), "y_scale"),
        numpy_helper.from_array(np.asarray(10, np.uint8), "y_zero_point"),
        numpy_helper.from_array(rng.integers(-1000, 1000, 4).astype(np.int32), "b"),
    ]
    node = helper.make_node("QLinearConv", ["x", "x_scale", "x_zero_point", "w", "w_scale", "w_zero_point", "y_scale",
                                            "y_zero_point", "b"], ["y"], name="my_conv", pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [_value("x", [1, 3, 5, 5], TensorProto.UINT8)],
                              [_value("y", [1, 4, 5, 5], TensorProto.UINT8)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def test_unsupported_qlinear_conv_names_the_node():
    with pytest.raises(ValueError, match="my_conv.*x_scale"):
        to_qdq(_qlinear_conv_model([0.1, 0.2], 0.01))  # per-channel activation scale
    with pytest.raises(ValueError, match="my_conv.*3 weight scales for 4"):
        to_qdq(_qlinear_conv_model(0.1, [0.01, 0.02, 0.03]))


def test_old_opset_is_raised_for_per_channel_scales():
    x = np.random.default_rng(2).integers(0, 256, (1, 3, 5, 5), dtype=np.uint8)
    per_tensor = _qlinear_conv_model(0.05, 0.01, opset=10)
    assert to_qdq(per_tensor).opset_import[0].version == 10  # per-tensor Q/DQ exist in opset 10
    per_channel = _qlinear_conv_model(0.05, [0.01, 0.02, 0.03, 0.04], opset=10)
    rewritten = to_qdq(per_channel)
    assert rewritten.opset_import[0].version == 13
    onnx.checker.check_model(rewritten, full_check=True)
    for model in (per_tensor, per_channel):
        expected = qoperator_outputs(model, [model.graph.output[0].name], {"x": x})[0].astype(np.int32)
        got = session(to_qdq(model), optimize=False).run(None, {"x": x})[0].astype(np.int32)
        assert np.abs(expected - got).max() <= 1


def test_conv_integer_from_dynamic_quantization(tmp_path):
    model, _ = fp32_models()["conv3x3_bias_relu"]
    onnx.save(model, tmp_path / "fp32.onnx")
    quantize_dynamic(tmp_path / "fp32.onnx", tmp_path / "dynamic.onnx", weight_type=QuantType.QUInt8)
    quantized = onnx.load(tmp_path / "dynamic.onnx")
    assert "ConvInteger" in {n.op_type for n in quantized.graph.node}
    rewritten = to_qdq(quantized)
    onnx.checker.check_model(rewritten, full_check=True)
    assert "ConvInteger" not in {n.op_type for n in rewritten.graph.node}
    (conv_integer,) = [n for n in quantized.graph.node if n.op_type == "ConvInteger"]
    feeds = random_inputs(model, 7)
    expected = qoperator_outputs(quantized, list(conv_integer.output), feeds)
    got = session(with_outputs(rewritten, conv_integer.output), optimize=False).run(list(conv_integer.output), feeds)
    np.testing.assert_array_equal(expected[0], got[0])  # exact: every partial sum is an integer below 2^24


@pytest.mark.slow
def test_tvm_imports_the_rewritten_model(tmp_path):
    """The point of the rewrite: TVM's Relax ONNX frontend takes the QDQ model and agrees with ONNX Runtime."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    model, _ = fp32_models()["chain"]
    quantized = qoperator(model, tmp_path, per_channel=True)
    executable = tvm.compile(from_onnx(to_qdq(quantized), keep_params_in_input=False), target="llvm")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    feeds = random_inputs(model, 11)
    got = vm["main"](tvm.runtime.tensor(feeds["x"])).numpy()
    expected = qoperator_outputs(quantized, [quantized.graph.output[0].name], feeds)[0]
    (output_scale,) = [numpy_helper.to_array(t) for t in quantized.graph.initializer if t.name == "y_scale"]
    assert np.abs(got - expected).max() <= float(output_scale) * 1.001


def test_conv_integer_that_could_overflow_float32_is_left_alone():
    weight = np.full((2, 64, 3, 3), 255, np.uint8)  # 255 * 255 * 576 > 2^24: float32 sums could round
    node = helper.make_node("ConvInteger", ["x", "w"], ["y"], name="big")
    graph = helper.make_graph([node], "g", [_value("x", [1, 64, 5, 5], TensorProto.UINT8)],
                              [_value("y", [1, 2, 3, 3], TensorProto.INT32)], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    assert to_qdq(model).SerializeToString() == model.SerializeToString()
    small = onnx.ModelProto.FromString(model.SerializeToString())
    small.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight // 16, "w"))
    assert [n.op_type for n in to_qdq(small).graph.node] == ["DequantizeLinear"] * 2 + ["Conv", "Cast"]
