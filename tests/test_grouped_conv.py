"""Grouped float convs (schedules.grouped_conv) and channel counts with no power-of-two factor: they match
onnxruntime in every configuration and their kernels are vectorized (packed FMAs), not scalar loops."""

import re

import numpy as np
import onnx
import pytest
from conftest import llvm_assembly, ort_outputs
from onnx import TensorProto, helper, numpy_helper

import edgeq
import targets
from edgeq.compiler import compile_module

REL_ERR = 1e-5  # float32 sums of at most 9 * 64 products, reordered: a few ulps of the largest output

GROUPED = {  # name: (input channels, output channels, groups, input side, Conv attributes)
    "regnet_group16": (64, 64, 4, 9, dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])),
    "resnext_width4_stride2": (128, 128, 32, 10, dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])),
    "two_groups_1x1": (16, 32, 2, 6, dict(kernel_shape=[1, 1])),
    "dilated_asymmetric_pads": (24, 48, 3, 11, dict(kernel_shape=[3, 3], pads=[0, 1, 2, 0], dilations=[2, 2])),
    "group_out_not_a_vector": (20, 10, 2, 7, dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])),
    "odd_channels_dense": (58, 58, 1, 8, dict(kernel_shape=[1, 1])),  # ShuffleNetV2 x1.0's 58 = 2 x 29
}


def _model(name: str):
    c_in, c_out, groups, side, attrs = GROUPED[name]
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((c_out, c_in // groups, *attrs["kernel_shape"]))
                                     .astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], group=groups, **attrs),
         helper.make_node("Relu", ["c"], ["y"])], name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    outputs = onnx.shape_inference.infer_shapes(model).graph.output
    model.graph.ClearField("output")
    model.graph.output.extend(outputs)
    return model, rng.standard_normal((1, c_in, side, side)).astype(np.float32)


@pytest.mark.parametrize("name", GROUPED)
def test_grouped_conv_matches_onnxruntime(name, tmp_path):
    model, x = _model(name)
    ours = edgeq.build(edgeq.load_onnx(model), "host", tmp_path / name).run({"x": x})["y"]
    oracle = ort_outputs(model, {"x": x})[0]
    assert ours.shape == oracle.shape
    assert np.abs(ours - oracle).max() <= REL_ERR * np.abs(oracle).max()


@pytest.mark.parametrize("name", ["regnet_group16", "odd_channels_dense"])
def test_grouped_and_odd_channel_convs_are_vectorized(name):
    asm = llvm_assembly(compile_module(edgeq.load_onnx(_model(name)[0]), targets.resolve("host")))
    assert re.search(r"^\s+vfmadd\w+ps\s+.*%[xyz]mm", asm, re.M)
