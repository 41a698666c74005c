"""relay_passes.quantize.lookup: elementwise activations between two 8-bit tensors become 256-entry tables.

Oracle: onnx.reference running the same QDQ model. The table evaluates the importer's float32 formula (e.g.
hard-swish as x * clip(x + 3, 0, 6) / 6) where the reference evaluates the ONNX definition
(x * max(0, min(1, x / 6 + 1/2))): the two may round differently by a few float32 ulps, so an output code may
differ by one, and only where the exact value lies within those ulps of a rounding boundary (a .5 step)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import edgeq

IN_SCALE, IN_ZERO = 0.05, 128  # uint8 codes 0..255 -> [-6.4, 6.35]: the whole range the functions bend in
OUT_SCALE, OUT_ZERO = 0.03, 40
ACTIVATIONS = {  # name -> (nodes from "d" to "a", opset)
    "HardSwish": ([helper.make_node("HardSwish", ["d"], ["a"])], 17),
    "SiLU": ([helper.make_node("Sigmoid", ["d"], ["s"]), helper.make_node("Mul", ["d", "s"], ["a"])], 17),
    "HardSigmoid": ([helper.make_node("HardSigmoid", ["d"], ["a"], alpha=0.2, beta=0.5)], 17),
    "Gelu": ([helper.make_node("Gelu", ["d"], ["a"])], 20),
    "Tanh": ([helper.make_node("Tanh", ["d"], ["a"])], 17),
    "Sigmoid": ([helper.make_node("Sigmoid", ["d"], ["a"])], 17),
}
ULPS = 8  # float32 ulps two evaluations of one of these formulas may differ by


def _qdq_island(name: str) -> onnx.ModelProto:
    nodes, _ = ACTIVATIONS[name]
    opset = 21  # onnx.reference implements DequantizeLinear from opset 19
    consts = [numpy_helper.from_array(np.array(v, dtype), n) for n, v, dtype in (
        ("si", IN_SCALE, np.float32), ("zi", IN_ZERO, np.uint8), ("so", OUT_SCALE, np.float32),
        ("zo", OUT_ZERO, np.uint8))]
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "si", "zi"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "si", "zi"], ["d"]), *nodes,
         helper.make_node("QuantizeLinear", ["a", "so", "zo"], ["qa"]),
         helper.make_node("DequantizeLinear", ["qa", "so", "zo"], ["y"])], name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_table_matches_the_onnx_reference_on_every_code(name, tmp_path):
    model = _qdq_island(name)
    x = ((np.arange(256) - IN_ZERO) * np.float32(IN_SCALE)).astype(np.float32).reshape(1, 256)  # every code
    artifact = edgeq.build(model, "host", tmp_path / name)
    assert "qlookup" in (artifact.path / "model.so").read_bytes().decode("latin-1")
    ours = np.rint(artifact.run({"x": x})["y"] / OUT_SCALE).astype(int)
    reference = ReferenceEvaluator(model)
    want = np.rint(reference.run(None, {"x": x})[0] / OUT_SCALE).astype(int)
    off = np.flatnonzero(ours != want)
    assert np.all(np.abs(ours - want) <= 1)
    # where they differ, the exact float value sits within a few ulps of the boundary between the two codes
    graph_a = onnx.helper.make_model(model.graph, opset_imports=model.opset_import)
    graph_a.graph.output.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 256]))
    a = ReferenceEvaluator(graph_a).run(["a"], {"x": x})[0].ravel().astype(np.float64)
    boundary = (np.minimum(ours, want).ravel()[off] - OUT_ZERO + 0.5) * OUT_SCALE
    assert np.all(np.abs(a[off] - boundary) <= ULPS * np.spacing(np.abs(a[off]).astype(np.float32) + 1))


def _conv_act_conv(name: str) -> onnx.ModelProto:
    nodes, opset = ACTIVATIONS[name]
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
               for n, s in (("w1", (16, 3, 3, 3)), ("b1", (16,)), ("w2", (16, 16, 3, 3)), ("b2", (16,)))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["d"], pads=[1, 1, 1, 1]), *nodes,
         helper.make_node("Conv", ["a", "w2", "b2"], ["y"], pads=[1, 1, 1, 1])], name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 12, 12])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("name", ["HardSwish", "SiLU"])
def test_an_activation_between_int8_convs_stays_integer_and_channels_last(name):
    """No float layer, and no layout change between the convs: the table reads the conv's NHWC codes."""
    import targets
    from edgeq.compiler import graph_module

    rng = np.random.default_rng(1)
    quantized = edgeq.quantize(_conv_act_conv(name), {"x": rng.standard_normal((4, 3, 12, 12)).astype(np.float32)})
    assert quantized.summary()["float_layers"] == {}
    text = graph_module(quantized.source, targets.resolve("host"), quantized.qdq).script()
    assert "qlookup" in text and text.count("R.dequantize(") == 1  # the model's float output only
    assert text.count("R.permute_dims") == 2  # the model's NCHW input in, its NCHW output out
