"""Convs that mostly read padding (relay_passes.conv_valid_taps): computed over exactly the (output, tap) pairs
that read the image, counted here by brute force, and equal to onnxruntime's padded convolution."""

import numpy as np
import pytest
from conftest import ort_outputs
from onnx import TensorProto, helper, numpy_helper

import edgeq
import targets
from edgeq.compiler import graph_module
from edgeq.frontend import load_onnx
from relay_passes.conv_valid_taps import tap_runs

REL_ERR = 1e-5  # the same products summed in another order

CONVS = {  # name: (input channels, output channels, groups, (height, width), Conv attributes, rewritten)
    "aspp_dilation_12": (64, 64, 1, (20, 20), dict(dilations=[12, 12], pads=[12, 12, 12, 12]), True),
    "aspp_taps_all_outside": (64, 32, 1, (10, 10), dict(dilations=[12, 12], pads=[12, 12, 12, 12]), True),
    "stride_2_asymmetric": (96, 96, 1, (18, 24), dict(dilations=[10, 14], pads=[10, 6, 8, 14], strides=[2, 2]),
                            True),
    "grouped": (128, 96, 4, (14, 14), dict(dilations=[8, 8], pads=[8, 8, 8, 8]), True),
    "ordinary_3x3": (8, 8, 1, (12, 12), dict(pads=[1, 1, 1, 1]), False),
    "small_map": (16, 32, 1, (4, 4), dict(pads=[1, 1, 1, 1]), False),  # the digits CNN's second conv
}


def _out_size(name):
    _, _, _, (h, w), attrs, _ = CONVS[name]
    (pt, pl, pb, pr), (sh, sw) = attrs["pads"], attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilations", [1, 1])
    return (h + pt + pb - 2 * dh - 1) // sh + 1, (w + pl + pr - 2 * dw - 1) // sw + 1


def _model(name):
    c_in, c_out, groups, (h, w), attrs, _ = CONVS[name]
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((c_out, c_in // groups, 3, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], group=groups, kernel_shape=[3, 3], **attrs)], name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, *_out_size(name)])], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _valid_pairs(size, out_size, stride, dilation, pad):
    """(output, tap) pairs of one axis whose input index lies in the image, by brute force."""
    return sum(0 <= o * stride + k * dilation - pad < size for o in range(out_size) for k in range(3))


def _conv_macs(mod) -> int:
    macs = 0
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if getattr(getattr(value, "op", None), "name", "") == "relax.nn.conv2d":
                out = [int(v) for v in value.ty.shape.values]
                weight = [int(v) for v in value.args[1].ty.shape.values]
                macs += int(np.prod(out)) * int(np.prod(weight[1:]))
    return macs


@pytest.mark.parametrize("name", CONVS)
def test_conv_computes_only_the_taps_inside_the_image_and_matches_onnxruntime(name, tmp_path):
    c_in, c_out, groups, (h, w), attrs, rewritten = CONVS[name]
    model = _model(name)
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    mod = graph_module(load_onnx(path), targets.resolve("host"))
    (pt, pl, _, _), (sh, sw) = attrs["pads"], attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilations", [1, 1])
    oh, ow = _out_size(name)
    padded_macs = oh * ow * 9 * c_out * c_in // groups
    useful_macs = _valid_pairs(h, oh, sh, dh, pt) * _valid_pairs(w, ow, sw, dw, pl) * c_out * c_in // groups
    assert _conv_macs(mod) == (useful_macs if rewritten else padded_macs)

    x = np.random.default_rng(1).standard_normal((1, c_in, h, w)).astype(np.float32)
    (want,) = ort_outputs(model, {"x": x})
    got = edgeq.build(path, "host", tmp_path / "out").run({"x": x})["y"]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= REL_ERR * np.abs(want).max()


def test_tap_runs_of_deeplab_aspp():
    """DeepLabV3's dilation-12 conv on a 20-pixel axis: the off-centre taps reach the image for 8 outputs each."""
    assert tap_runs(20, 20, 3, 1, 12, 12) == [(0, 8, 1, 3), (8, 12, 1, 2), (12, 20, 0, 2)]
    assert tap_runs(20, 20, 3, 1, 24, 24) == [(0, 20, 1, 2)]  # dilation 24 and 36: a 1x1 conv
