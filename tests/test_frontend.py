"""ONNX loading: every bad input gives one clear EdgeqError; good input imports with static shapes."""

import onnx
import pytest
import zoo

import edgeq
from edgeq import EdgeqError


def test_imports_static_model_with_signature():
    model = edgeq.load_onnx(zoo.ZOO["add"]())
    assert [(s.name, s.shape, s.dtype) for s in model.inputs] == [("x", (1, 8, 12, 12), "float32"),
                                                                  ("y", (8, 1, 1), "float32")]
    assert [s.name for s in model.outputs] == ["out"]
    assert model.opset == 17 and len(model.sha256) == 64


def test_missing_file(tmp_path):
    with pytest.raises(EdgeqError, match="no such file"):
        edgeq.load_onnx(tmp_path / "nope.onnx")


def test_garbage_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07this is not protobuf\xff\xff\xff")
    with pytest.raises(EdgeqError, match="cannot read .* as ONNX|not an ONNX model"):
        edgeq.load_onnx(bad)


def test_empty_file_is_not_a_model(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(EdgeqError, match="not an ONNX model"):
        edgeq.load_onnx(empty)


def test_invalid_model_names_the_checker_problem():
    model = zoo.ZOO["relu"]()
    model.graph.node[0].input[0] = "does_not_exist"
    with pytest.raises(EdgeqError, match="invalid ONNX model: .*does_not_exist"):
        edgeq.load_onnx(model)


def test_dynamic_dims_must_be_fixed():
    with pytest.raises(EdgeqError, match=r"dynamic input dims .* x\[batch, 3, 16, 16\].*--input-shape x=1x3x16x16"):
        edgeq.load_onnx(zoo.dynamic_batch_model())


def test_input_shape_fixes_dynamic_dims():
    model = edgeq.load_onnx(zoo.dynamic_batch_model(), {"x": (4, 3, 16, 16)})
    assert model.inputs[0].shape == (4, 3, 16, 16)
    assert model.outputs[0].shape == (4, 10)


@pytest.mark.parametrize("shapes, message", [
    ({"nope": (1, 3, 16, 16)}, "unknown input.*nope.*inputs are x"),
    ({"x": (1, 3, 16)}, "rank 3 given.*rank 4"),
    ({"x": (2, 4, 16, 16)}, "dim 1 is fixed to 3"),
])
def test_bad_input_shapes(shapes, message):
    with pytest.raises(EdgeqError, match=message):
        edgeq.load_onnx(zoo.dynamic_batch_model(), shapes)


def test_unsupported_ops_are_all_listed_with_node_names():
    with pytest.raises(EdgeqError) as info:
        edgeq.load_onnx(zoo.unsupported_ops_model())
    message = str(info.value)
    for op, nodes in zoo.UNSUPPORTED_OPS.items():
        assert op in message
        for node in nodes:
            assert node in message
    assert "\n" not in message


def test_caller_model_is_not_modified():
    proto = zoo.dynamic_batch_model()
    before = proto.SerializeToString()
    edgeq.load_onnx(proto, {"x": (2, 3, 16, 16)})
    assert proto.SerializeToString() == before


def test_loads_from_file(tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(zoo.ZOO["conv"](), path)
    model = edgeq.load_onnx(path)
    assert model.name == "conv"
