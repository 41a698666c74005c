"""The importer's Clip becomes Relax maximum/minimum: fused into the conv before it, outputs unchanged."""

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

import targets
from conftest import ort_outputs
from edgeq.compiler import codegen, graph_module
from edgeq.frontend import load_onnx
from schedules.lowering import pre_schedule


def conv_clip(bounds: tuple, runtime_max: bool = False) -> onnx.ModelProto:
    """Conv -> Clip(bounds) (None: bound left out); runtime_max: the upper bound is a model input."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w")]
    names = []
    for name, value in zip(("lo", "hi"), bounds):
        if value is not None:
            inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
        names.append(name if value is not None else "")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 10, 10])]
    if runtime_max:
        names[1] = "hi_in"
        inputs.append(helper.make_tensor_value_info("hi_in", TensorProto.FLOAT, []))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c", *names], ["y"])]
    graph = helper.make_graph(nodes, "conv_clip", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 10, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model, feeds):
    preset = targets.resolve("host")
    imported = load_onnx(model)
    mod = graph_module(imported, preset)
    vm = relax.VirtualMachine(codegen(mod, preset), tvm.cpu())
    return mod, vm["main"](*[tvm.runtime.tensor(feeds[s.name]) for s in imported.inputs]).numpy()


@pytest.mark.parametrize("bounds", [(0.0, 6.0), (-0.5, None), (None, 0.25)])
def test_clip_by_constants_fuses_into_the_conv(bounds):
    model = conv_clip(bounds)
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 4, 10, 10)).astype(np.float32)}
    mod, got = _run(model, feeds)
    assert "call_tir" not in str(mod["main"])
    with targets.tvm_target(targets.resolve("host")) as target:
        kernels = [g.name_hint for g, f in pre_schedule(mod, target).functions.items()
                   if isinstance(f, tvm.tirx.PrimFunc)]
    (conv,) = [k for k in kernels if "conv2d" in k]
    assert ("maximum" in conv) == (bounds[0] is not None) and ("minimum" in conv) == (bounds[1] is not None)
    assert not [k for k in kernels if "transpose" in k and ("maximum" in k or "minimum" in k)]
    np.testing.assert_allclose(got, ort_outputs(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_clip_by_a_runtime_bound_is_left_as_it_is():
    model = conv_clip((0.0, 6.0), runtime_max=True)
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 4, 10, 10)).astype(np.float32),
             "hi_in": np.array(0.3, np.float32)}
    mod, got = _run(model, feeds)
    assert "R.call_tir(minimum" in str(mod["main"]) and "R.maximum" in str(mod["main"])
    np.testing.assert_allclose(got, ort_outputs(model, feeds)[0], rtol=1e-5, atol=1e-5)
