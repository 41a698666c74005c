"""LSTM / GRU / RNN unrolled by edgeq.recurrent match onnxruntime (onnx.reference for layout 1, which
onnxruntime does not run) in every direction and option; DynamicQuantizeLSTM matches the LSTM its weights
dequantize to; what cannot be unrolled is refused by name."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import edgeq
from edgeq.onnx_backend import EdgeqBackend

from conftest import ort_outputs

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# fp32, a few steps of products of size <= 8: float rounding of a different summation order
ATOL = 1e-5


def recurrent_model(op, direction="forward", layout=0, bias=True, initial=True, peepholes=False, lengths=None,
                    steps=5, batch=2, inputs=3, hidden=4, opset=14, seed=0, **attrs):
    """A one-node model: weights (and initial states) as initializers, x (and sequence_lens) as inputs."""
    rng = np.random.default_rng(seed)
    directions = 2 if direction == "bidirectional" else 1
    gates = GATES[op]
    x_shape = (steps, batch, inputs) if layout == 0 else (batch, steps, inputs)
    state_shape = (directions, batch, hidden) if layout == 0 else (batch, directions, hidden)

    def init(name, shape, scale=1.0):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    initializers = [init("W", (directions, gates * hidden, inputs), 0.5), init("R", (directions, gates * hidden, hidden), 0.5)]
    names = ["x", "W", "R", "B" if bias else "", "L" if lengths is not None else ""]
    if bias:
        initializers.append(init("B", (directions, 2 * gates * hidden)))
    if initial:
        names.append("h0")
        initializers.append(init("h0", state_shape))
        if op == "LSTM":
            names.append("c0")
            initializers.append(init("c0", state_shape))
    if peepholes:
        names += [""] * (7 - len(names)) + ["P"]
        initializers.append(init("P", (directions, 3 * hidden)))
    attrs.update(hidden_size=hidden, direction=direction)
    if opset >= 14:
        attrs["layout"] = layout
    outputs = ["y", "y_h"] + (["y_c"] if op == "LSTM" else [])
    y_shape = (steps, directions, batch, hidden) if layout == 0 else (batch, steps, directions, hidden)
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    if lengths is not None:
        graph_inputs.append(helper.make_tensor_value_info("L", TensorProto.INT32, [batch]))
    graph = helper.make_graph(
        [helper.make_node(op, names, outputs, name="recurrent", **attrs)], "recurrent", graph_inputs,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, s) for o, s in zip(outputs, [y_shape, state_shape, state_shape])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32)}
    if lengths is not None:
        feeds["L"] = np.array(lengths, np.int32)
    return model, feeds


def _check(model, feeds, oracle=ort_outputs):
    expected = oracle(model, feeds)
    got = EdgeqBackend.prepare(model).run(list(feeds.values()))
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)


CASES = {
    **{f"{op}_{d}": dict(op=op, direction=d) for op in GATES for d in ("forward", "reverse", "bidirectional")},
    "GRU_linear_before_reset": dict(op="GRU", direction="bidirectional", linear_before_reset=1),
    "LSTM_peepholes": dict(op="LSTM", peepholes=True),
    "LSTM_no_bias_no_initial_state": dict(op="LSTM", bias=False, initial=False),
    "LSTM_clip": dict(op="LSTM", clip=0.5),
    "LSTM_input_forget": dict(op="LSTM", input_forget=1),
    "LSTM_one_step_opset9": dict(op="LSTM", steps=1, opset=9),
    "LSTM_activations": dict(op="LSTM", direction="bidirectional", activations=["HardSigmoid", "LeakyRelu", "Softsign"] * 2,
                             activation_alpha=[0.3, 0.05, 0.25, 0.1], activation_beta=[0.4, 0.6]),
    "RNN_relu": dict(op="RNN", activations=["Relu"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recurrent_op_matches_onnxruntime(case):
    _check(*recurrent_model(**CASES[case]))


@pytest.mark.parametrize("op", sorted(GATES))
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_per_example_sequence_lengths_mask_the_steps(op, direction):
    """Past a sequence's end the state is kept and the output is zeros; the reverse pass starts at each
    sequence's own end (batch 3: full, shorter, length 1)."""
    _check(*recurrent_model(op, direction, lengths=[5, 3, 1], batch=3))


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_batch_first_layout_matches_the_onnx_reference(op):
    model, feeds = recurrent_model(op, "bidirectional", layout=1)
    _check(model, feeds, lambda m, f: ReferenceEvaluator(m).run(None, f))


def test_dynamic_quantize_lstm_is_the_lstm_of_its_dequantized_weights(tmp_path):
    """onnxruntime's quantize_dynamic turns an LSTM into com.microsoft.DynamicQuantizeLSTM (int8 W/R, transposed,
    per-gate-row scales): edgeq runs the float LSTM of (q - zero) * scale, formed here in numpy."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, feeds = recurrent_model("LSTM", "bidirectional", steps=4, hidden=8, inputs=6)
    onnx.save(model, tmp_path / "float.onnx")
    quantize_dynamic(tmp_path / "float.onnx", tmp_path / "dynamic.onnx", weight_type=QuantType.QInt8, per_channel=True)
    quantized = onnx.load(tmp_path / "dynamic.onnx")
    node = next(n for n in quantized.graph.node if n.op_type == "DynamicQuantizeLSTM")
    values = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}

    def dequantized(q, scale, zero):
        w, s, z = values[node.input[q]], values[node.input[scale]], values[node.input[zero]]
        return ((w.astype(np.float32) - z[:, None, :]) * s[:, None, :]).transpose(0, 2, 1)

    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    for t in reference.graph.initializer:
        if t.name in ("W", "R"):
            t.CopyFrom(numpy_helper.from_array(dequantized(*((1, 8, 9) if t.name == "W" else (2, 10, 11))), t.name))
    expected = ort_outputs(reference, feeds)
    got = EdgeqBackend.prepare(quantized).run(list(feeds.values()))
    for ours, theirs in zip(got, expected):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)


def test_an_activation_outside_the_table_is_refused_by_name():
    model, _ = recurrent_model("RNN", activations=["ScaledTanh"], activation_alpha=[1.0], activation_beta=[1.0])
    with pytest.raises(edgeq.EdgeqError, match="RNN node 'recurrent' uses activation 'ScaledTanh'"):
        edgeq.load_onnx(model)
