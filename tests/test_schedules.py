"""The default CPU schedule is applied (parallel, vectorized kernels on NHWC convs); numerics are in test_zoo."""

import tvm
import zoo
from tvm import tirx

import edgeq
import targets
from relay_passes import pipeline
from schedules.default_cpu import default_cpu_layout_passes
from schedules.lowering import lowering_pipeline


def host_target():
    return targets.tvm_target(targets.resolve("host"))


def test_conv_kernels_are_parallel_and_vectorized():
    model = edgeq.load_onnx(zoo.ZOO["mixed"]())
    lowered = lowering_pipeline(host_target())(pipeline.optimize(model.mod))
    prim_funcs = {gv.name_hint: f for gv, f in lowered.functions.items() if isinstance(f, tirx.PrimFunc)}
    convs = {name: f for name, f in prim_funcs.items() if "conv2d" in name}
    assert convs, sorted(prim_funcs)
    for name, func in convs.items():
        assert func.attrs["tirx.is_scheduled"], name
        script = func.script()
        assert "T.parallel(" in script and "T.vectorized(" in script, name


def test_convolutions_are_converted_to_nhwc():
    model = edgeq.load_onnx(zoo.ZOO["conv"]())
    target = host_target()
    with target:
        mod = tvm.transform.Sequential(default_cpu_layout_passes(target))(model.mod)
    assert 'data_layout="NHWC"' in mod.script()
