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


def test_batch_norm_after_a_conv_is_folded_into_its_weights():
    model = edgeq.load_onnx(zoo.ZOO["batchnorm"]())
    script = pipeline.optimize(model.mod).script()
    assert "R.nn.conv2d" in script
    for op in ("batch_norm", "R.divide", "R.subtract", "R.multiply"):
        assert op not in script, op


def test_register_tiles_live_on_the_stack():
    """A tile buffer TVM cannot put on the stack costs a TVMBackendAllocWorkspace call per tile (2x slower)."""
    from edgeq.build import _modules

    shape = [1, 32, 28, 28]  # big enough to be parallelised
    models = {"conv": zoo._conv(32, 64, shape=shape), "depthwise": zoo._conv(32, 32, group=32, shape=shape),
              "conv_bn": zoo._conv(32, 32, bn=True, shape=shape)}
    for name, build in models.items():
        model = edgeq.load_onnx(build())
        target = host_target()
        with target:
            ex = tvm.compile(pipeline.optimize(model.mod), target, relax_pipeline=lowering_pipeline(target))
        ir = "\n".join(m.inspect_source("ll") for m in _modules(ex.mod) if m.kind == "llvm")
        lambdas = [f for f in ir.split("\ndefine ")[1:] if f.split("(", 1)[0].endswith("parallel_lambda")]
        assert lambdas, name
        for body in lambdas:
            assert "AllocWorkspace" not in body, (name, body.split("(", 1)[0])


def test_a_weight_tvm_cannot_repack_is_read_as_it_is():
    """An int8 depthwise weight read at a constant index defeats TVM's index-map inverse: the kernel must
    still be register-tiled and vectorized (it used to fall back to a scalar loop)."""
    from tvm import te

    from schedules import qkernels
    from schedules.default_cpu import default_schedule_func

    data, weight = te.placeholder((1, 28, 28, 32), "uint8"), te.placeholder((3, 3, 1, 32), "int8")
    bias, multiplier, shift = (te.placeholder((32,), "int32") for _ in range(3))
    out = qkernels.qconv2d(data, weight, bias, multiplier, shift, strides=(1, 1), padding=(1, 1, 1, 1),
                           dilation=(1, 1), groups=32, input_zero_point=3, output_zero_point=0, out_min=0,
                           out_max=255, out_dtype="uint8")
    func = te.create_prim_func([data, weight, bias, multiplier, shift, out]).with_attr("layout_free_buffers", [1])
    script = default_schedule_func(func, host_target()).script()
    assert "T.vectorized(" in script and "T.unroll(" in script


def test_a_prime_row_count_still_gets_a_full_register_tile():
    """ViT's 197 tokens are prime: no divisor of 197 fills the register tile, which fell back to one row (two
    accumulators, 3.7x slower than 196 rows); a partial last tile guarded by a predicate keeps it full."""
    import re

    import numpy as np
    from conftest import ort_outputs
    from onnx import TensorProto, helper, numpy_helper

    from schedules.dot_product import row_tile

    assert [row_tile(extent, 8) for extent in (196, 197, 13, 7, 22)] == [7, 6, 7, 7, 8]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 197, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 197, 48])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    lowered = lowering_pipeline(host_target())(pipeline.optimize(edgeq.load_onnx(model).mod))
    script = next(f.script() for gv, f in lowered.functions.items()
                  if isinstance(f, tirx.PrimFunc) and "matmul" in gv.name_hint)
    assert max(int(n) for n in re.findall(r"T\.unroll\(T\.int64\((\d+)\)\)", script)) > 1
    x = rng.standard_normal((1, 197, 64)).astype(np.float32)
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        ours = next(iter(edgeq.build(model, "host", out).run({"x": x}).values()))
    oracle = ort_outputs(model, {"x": x})[0]
    assert np.abs(ours - oracle).max() <= 1e-5 * np.abs(oracle).max()


def test_attention_scores_with_a_prime_token_count_are_vectorized_and_exact():
    """q @ k^T over ViT's 197 tokens: no lane count divides the output width, so k^T gets zero columns up to a
    multiple of 16 (schedules.padded_matmul) and the result is sliced back. The slice must stay a block of its
    own: inlined into the padded write-back it wrote past the end of each row (wrong scores)."""
    import re
    import tempfile

    import numpy as np
    from conftest import ort_outputs
    from onnx import TensorProto, helper

    tokens = 197
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["q", "k"], ["s"]), helper.make_node("Softmax", ["s"], ["y"], axis=-1)], "g",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 2, tokens, 16]),
         helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 2, 16, tokens])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, tokens, tokens])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    lowered = lowering_pipeline(host_target())(pipeline.optimize(edgeq.load_onnx(model).mod))
    script = next(f.script() for gv, f in lowered.functions.items()
                  if isinstance(f, tirx.PrimFunc) and "matmul" in gv.name_hint)
    assert re.search(r"T\.vectorized\(T\.int64\(16\)\)", script)
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((1, 2, tokens, 16)).astype(np.float32),
             "k": rng.standard_normal((1, 2, 16, tokens)).astype(np.float32)}
    with tempfile.TemporaryDirectory() as out:
        ours = edgeq.build(model, "host", out).run(feeds)["y"]
    oracle = ort_outputs(model, feeds)[0]
    assert np.abs(ours - oracle).max() <= 1e-5 * np.abs(oracle).max()


def _detection_head():
    """YOLOv8's head in miniature: three conv outputs (NHWC inside edgeq) flattened to [1, C, cells], joined
    along the cells, split into boxes and class scores, sigmoid on the scores, joined again."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    channels, sizes = 12, (8, 4, 2)
    nodes, inits, inputs, flat = [], [], [], []
    for i, size in enumerate(sizes):
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, 8, size, size]))
        inits.append(numpy_helper.from_array(rng.standard_normal((channels, 8, 1, 1)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("Conv", [f"x{i}", f"w{i}"], [f"c{i}"]),
                  helper.make_node("Reshape", [f"c{i}", "flat_shape"], [f"f{i}"])]
        flat.append(f"f{i}")
    inits += [numpy_helper.from_array(np.array([1, channels, -1], np.int64), "flat_shape"),
              numpy_helper.from_array(np.array([4, channels - 4], np.int64), "split")]
    nodes += [helper.make_node("Concat", flat, ["cells"], axis=2),
              helper.make_node("Split", ["cells", "split"], ["box", "cls"], axis=1),
              helper.make_node("Sigmoid", ["cls"], ["score"]),
              helper.make_node("Concat", ["box", "score"], ["y"], axis=1)]
    cells = sum(s * s for s in sizes)
    graph = helper.make_graph(nodes, "head", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                    [1, channels, cells])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    feeds = {f"x{i}": rng.standard_normal((1, 8, s, s)).astype(np.float32) for i, s in enumerate(sizes)}
    return model, feeds


def test_concatenations_copy_each_input_without_a_branch_per_element():
    """TVM's concat picks its input per output element (an if_then_else chain): fused with the transposes of a
    detection head it stayed scalar (YOLOv8n: 1.2 ms of 10). schedules.concat_parts gives each input a copy
    block of its own: no branch is left, the copies vectorize, and the values are ORT's."""
    import tempfile

    import numpy as np
    from conftest import ort_outputs

    model, feeds = _detection_head()
    lowered = lowering_pipeline(host_target())(pipeline.optimize(edgeq.load_onnx(model).mod))
    scripts = [f.script() for gv, f in lowered.functions.items()
               if isinstance(f, tirx.PrimFunc) and "concatenate" in gv.name_hint]
    assert scripts
    for script in scripts:
        assert "if_then_else" not in script and "T.vectorized(" in script, script
    with tempfile.TemporaryDirectory() as out:
        ours = edgeq.build(model, "host", out).run(feeds)["y"]
    oracle = ort_outputs(model, feeds)[0]
    assert np.abs(ours - oracle).max() <= 1e-5 * np.abs(oracle).max()  # 8-term conv sums in another order


def test_concat_parts_equal_numpy_on_every_axis():
    import tempfile

    import numpy as np
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    onnx_dtypes = {"float32": TensorProto.FLOAT, "uint8": TensorProto.UINT8, "int8": TensorProto.INT8}
    for axis, dtype in ((0, "float32"), (1, "uint8"), (2, "int8"), (3, "float32")):
        shapes = [[2, 3, 4, 5], [2, 3, 4, 5], [2, 3, 4, 5]]
        shapes[1][axis], shapes[2][axis] = 1, 7
        arrays = [rng.integers(-100, 100, s).astype(dtype) for s in shapes]
        out_shape = list(shapes[0])
        out_shape[axis] = sum(s[axis] for s in shapes)
        graph = helper.make_graph(
            [helper.make_node("Concat", ["a0", "a1", "a2"], ["y"], axis=axis)], "cat",
            [helper.make_tensor_value_info(f"a{i}", onnx_dtypes[dtype], s) for i, s in enumerate(shapes)],
            [helper.make_tensor_value_info("y", onnx_dtypes[dtype], out_shape)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        with tempfile.TemporaryDirectory() as out:
            ours = edgeq.build(model, "host", out).run({f"a{i}": a for i, a in enumerate(arrays)})["y"]
        np.testing.assert_array_equal(ours, np.concatenate(arrays, axis=axis), err_msg=f"axis {axis} {dtype}")
