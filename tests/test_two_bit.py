"""Low-bit modes end to end on the bundled digits model: SAWB weights + PACT activations, realized as bit-serial
popcount kernels (int8 kernels on targets without popcount), checked against onnxruntime running the same QDQ model."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import tvm
from conftest import llvm_assembly, ort_outputs, popcount_pattern
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

import edgeq
import targets
from edgeq.artifact import QUANTIZED_MODEL
from edgeq.compiler import compile_module, graph_module
from edgeq.demo import DIGITS_CALIB, DIGITS_MODEL, DIGITS_TEST
from edgeq.frontend import load_onnx
from relay_passes.quantize import realize as realize_mod
from edgeq.compiler import realize_onnx
from relay_passes.quantize import storage


@pytest.fixture(scope="module")
def digits():
    test = np.load(DIGITS_TEST)
    return load_onnx(DIGITS_MODEL, {"image": (1, 1, 8, 8)}), test["image"], test["label"]


@pytest.fixture(scope="module")
def w2a2(digits):
    imported, _, _ = digits
    return edgeq.quantize(imported, DIGITS_CALIB, mode="w2a2")


def _logits(executable, images):
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return np.concatenate([vm["main"](tvm.runtime.tensor(images[i:i + 1])).numpy() for i in range(len(images))])


def _bitserial_weights(mod):
    """(kernel name, weight constant) of every low-bit kernel call in a realized module."""
    found = []
    for binding in mod["main"].body.blocks[0].bindings:
        value = binding.value
        if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.call_tir":
            name = value.args[0].name_hint
            if name.startswith("bitserial"):
                found.append((name, value.args[1].fields[1].value.numpy()))
    return found


def test_w2a2_plan_keeps_first_and_last_layers_8bit(w2a2):
    layers = {g["node"]: g for g in w2a2.summary()["quantized_layers"]}
    assert w2a2.summary()["mode"] == "w2a2"
    assert "weight_bits" not in layers["/0/Conv"] and "weight_bits" not in layers["/9/Gemm"]  # first, last: 8-bit
    assert layers["/4/Conv"]["weight_bits"] == 2
    # the first conv requantizes straight to 2-bit PACT codes, the max pool keeps them
    assert layers["/0/Conv"]["output_bits"] == 2 and layers["/3/MaxPool"]["output_bits"] == 2
    clip = next(n for n in w2a2.qdq.graph.node if n.name == "/2/Relu")
    assert clip.op_type == "Clip"  # PACT replaces the ReLU
    inits = {t.name: t for t in w2a2.qdq.graph.initializer}
    from onnx import numpy_helper

    alpha = float(numpy_helper.to_array(inits[clip.input[2]]))
    scale = float(numpy_helper.to_array(inits["/3/MaxPool_output_0.scale"]))
    assert alpha == pytest.approx(3 * scale, rel=1e-6)  # 2-bit codes 0..3 cover [0, alpha]
    w = numpy_helper.to_array(inits["/4/Conv.weight.q"])
    assert set(np.unique(w)) <= {-3, -1, 1, 3}  # SAWB levels as odd integers


def test_w2a2_digits_runs_bit_serial_and_matches_onnxruntime(digits, w2a2):
    imported, images, labels = digits
    executable = compile_module(imported, targets.resolve("host"), w2a2.qdq)
    logits = _logits(executable, images)
    oracle = np.concatenate([ort_outputs(w2a2.qdq, {"image": images[i:i + 1]})[0] for i in range(len(images))])
    accuracy = float(np.mean(logits.argmax(1) == labels))
    agreement = float(np.mean(logits.argmax(1) == oracle.argmax(1)))
    print(f"w2a2 digits accuracy {accuracy:.4f}, agreement with onnxruntime's QDQ run {agreement:.4f}")
    assert accuracy >= 0.93  # fp32 99.2%, int8 99.2%; measured 96.1% for w2a2
    assert agreement >= 0.99
    asm = llvm_assembly(executable)
    assert re.search(popcount_pattern(targets.tvm_target(targets.resolve("host"))), asm, re.M)


def test_w2a2_weights_are_bit_packed(digits, w2a2):
    imported, _, _ = digits
    mod = realize_onnx(w2a2.qdq, "uint8")
    kernels = _bitserial_weights(mod)
    assert [name for name, _ in kernels] == ["bitserial_qconv2d"]
    (_, planes), = kernels
    fp32 = next(t for t in imported.onnx_model.graph.initializer if t.name == "4.weight")
    fp32_bytes = int(np.prod(fp32.dims)) * 4
    assert planes.nbytes * 14 <= fp32_bytes, (planes.nbytes, fp32_bytes)


def _constants(mod) -> list[np.ndarray]:
    """Every tensor constant an op of the module's main reads (a walk of its own, not storage.py's)."""
    from tvm.ir.expr import GenericConst

    found = []

    def visit(expr):
        if isinstance(expr, GenericConst):
            found.append(expr.value.numpy())
        elif isinstance(expr, (relax.Tuple, relax.Call)):
            for child in expr.fields if isinstance(expr, relax.Tuple) else expr.args:
                visit(child)

    for binding in mod["main"].body.blocks[0].bindings:
        visit(binding.value)
    return found


def _bytes_by_dtype(constants) -> dict[str, int]:
    totals: dict[str, int] = {}
    for c in constants:
        totals[c.dtype.name] = totals.get(c.dtype.name, 0) + c.nbytes
    return totals


def test_w2a2_manifest_reports_the_bit_packed_weight_bytes(digits, w2a2, tmp_path):
    imported, _, _ = digits
    q = edgeq.build(w2a2, "host", tmp_path / "w2a2").manifest["quantization"]
    packed = q["weights_by_precision"]["2-bit packed"]
    assert packed["layers"] == ["/4/Conv"] and packed["fp32_bytes"] == 32 * 16 * 3 * 3 * 4
    assert packed["bytes"] * 14 <= packed["fp32_bytes"]  # 4 weights a byte (16 channels: one uint16 word a plane)
    assert q["weights_by_precision"]["int8"]["layers"] == ["/0/Conv", "/9/Gemm"]  # first and last stay 8-bit
    # the manifest is what the realized module holds: its constants by dtype, bit planes in uint16 words
    stored = _bytes_by_dtype(_constants(graph_module(imported, targets.resolve("host"), w2a2.qdq)))
    by_dtype = {"2-bit packed": "uint16", "int8": "int8", storage.REQUANTIZE: "int32", "float32": "float32",
                "uint8": "uint8"}
    assert {by_dtype[label]: n for label, n in q["weight_bytes"].items()} == stored


def test_int8_manifest_reports_a_byte_per_weight_and_fp32_its_floats(digits, tmp_path):
    imported, _, _ = digits
    quantized = edgeq.quantize(imported, DIGITS_CALIB)
    q = edgeq.build(quantized, "host", tmp_path / "int8").manifest["quantization"]
    weights = sum(numpy_helper.to_array(t).size for t in quantized.qdq.graph.initializer
                  if t.name.endswith(".weight.q"))
    int8 = q["weights_by_precision"]["int8"]
    assert int8["fp32_bytes"] == 4 * weights
    # one byte per weight, plus the zeros that pad the first conv's 1 input channel to the dot product's 4
    assert int8["bytes"] == weights + 16 * 3 * 3 * 3
    host = targets.resolve("host")
    assert int8["bytes"] == _bytes_by_dtype(_constants(graph_module(imported, host, quantized.qdq)))["int8"]
    fp32 = storage.weights_by_precision(graph_module(imported, host))
    assert list(fp32) == ["float32"] and fp32["float32"]["bytes"] == fp32["float32"]["fp32_bytes"]
    assert fp32["float32"]["bytes"] == sum(_bytes_by_dtype(_constants(graph_module(imported, host))).values())


def test_without_popcount_the_same_integers_run_on_int8_kernels(digits, w2a2):
    imported, images, _ = digits
    host = targets.tvm_target(targets.resolve("host"))
    from relay_passes import pipeline
    from schedules.lowering import lowering_pipeline

    def compiled(target_for_realize):
        mod = pipeline.optimize(realize_onnx(w2a2.qdq, "uint8", target_for_realize))
        return mod, tvm.compile(mod, host, relax_pipeline=lowering_pipeline(host))

    baseline = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})  # no POPCNT
    mod_int8, ex_int8 = compiled(baseline)
    mod_bs, ex_bs = compiled(host)
    names = lambda m: {gv.name_hint for gv in m.functions}  # noqa: E731
    assert not any(n.startswith("bitserial") for n in names(mod_int8))
    assert any(n.startswith("bitserial_qconv2d") for n in names(mod_bs))
    subset = images[:60]
    np.testing.assert_array_equal(_logits(ex_int8, subset), _logits(ex_bs, subset))  # integer-exact, both ways


def test_arm_int8_activations_run_the_same_bit_serial_integers(digits, w2a2):
    # ARM realizes int8 activations (q = code - 128): the low-bit layers still go bit-serial, with identical logits
    imported, images, _ = digits
    host = targets.tvm_target(targets.resolve("host"))
    from relay_passes import pipeline
    from schedules.lowering import lowering_pipeline

    def logits(dtype):
        mod = pipeline.optimize(realize_onnx(w2a2.qdq, dtype))
        assert any(gv.name_hint.startswith("bitserial_qconv2d") for gv in mod.functions)
        return _logits(tvm.compile(mod, host, relax_pipeline=lowering_pipeline(host)), images[:60])

    np.testing.assert_array_equal(logits("int8"), logits("uint8"))
    rpi4 = compile_module(imported, targets.resolve("rpi4"), w2a2.qdq)  # cross-compiled: NEON cnt
    assert re.search(r"^\s+cnt\s+v\d+\.(16b|8b)", llvm_assembly(rpi4), re.M)


@pytest.mark.parametrize("mode,floor", [("w2a8", 0.95), ("w4a4", 0.97)])
def test_other_low_bit_modes(digits, mode, floor):
    imported, images, labels = digits
    quantized = edgeq.quantize(imported, DIGITS_CALIB, mode=mode)
    executable = compile_module(imported, targets.resolve("host"), quantized.qdq)
    accuracy = float(np.mean(_logits(executable, images).argmax(1) == labels))
    print(f"{mode} digits accuracy {accuracy:.4f}")
    assert accuracy >= floor  # measured: w2a8 98.6%, w4a4 99.4%
    assert _bitserial_weights(realize_onnx(quantized.qdq, "uint8"))


def test_two_bit_last_layer_runs_bit_serial_dense(digits):
    imported, images, labels = digits
    quantized = edgeq.quantize(imported, DIGITS_CALIB, mode="w2a2", keep_8bit=("first",))
    layers = {g["node"]: g for g in quantized.summary()["quantized_layers"]}
    assert layers["/9/Gemm"]["weight_bits"] == 2
    kernels = [name for name, _ in _bitserial_weights(realize_onnx(quantized.qdq, "uint8"))]
    assert kernels == ["bitserial_qconv2d", "bitserial_qdense"]  # the Flatten input is 8-bit: a=8 planes
    executable = compile_module(imported, targets.resolve("host"), quantized.qdq)
    subset = images[:120]
    logits = _logits(executable, subset)
    oracle = np.concatenate([ort_outputs(quantized.qdq, {"image": subset[i:i + 1]})[0] for i in range(len(subset))])
    assert float(np.mean(logits.argmax(1) == oracle.argmax(1))) >= 0.99  # measured: identical logits
    assert float(np.mean(logits.argmax(1) == labels[:120])) >= 0.9  # measured 94.2% on all 360


def test_low_bit_weight_detection():
    detect = realize_mod._low_bit_weight
    assert detect(np.array([[-3, -1, 1, 3]])) == 2
    assert detect(np.array([[-1, 1, 1]])) == 1
    assert detect(np.array([[-15, 7, 1]])) == 4
    assert detect(np.array([[-3, 0, 1]])) == 0  # a zero: not SAWB levels of an even count
    assert detect(np.array([[-31, 1]])) == 0  # 5 bits: left to the int8 kernels


def test_unknown_mode():
    with pytest.raises(edgeq.EdgeqError if hasattr(edgeq, "EdgeqError") else Exception):
        edgeq.quantize(DIGITS_MODEL, DIGITS_CALIB, mode="w3a3")


def _qat_model():
    """A QAT-style export: 8-bit input conv, then two SAWB 2-bit convs, each reading PACT Clip(0, alpha) + 2-bit
    fake quant (so the first 2-bit conv requantizes straight to the second one's 2-bit codes); 8-bit output."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    alpha = 1.7
    w1 = rng.integers(-127, 128, (12, 3, 3, 3)).astype(np.int8)
    w2 = (2 * rng.integers(0, 4, (10, 12, 3, 3)) - 3).astype(np.int8)  # SAWB integers {-3, -1, 1, 3}
    consts = {
        "x.s": np.float32(0.02), "x.z": np.uint8(128),
        "w1": w1, "w1.s": rng.uniform(0.001, 0.003, 12).astype(np.float32), "w1.z": np.zeros(12, np.int8),
        "lo": np.float32(0.0), "alpha": np.float32(alpha), "a.s": np.float32(alpha / 3), "a.z": np.uint8(0),
        "w2": w2, "w2.s": rng.uniform(0.02, 0.05, 10).astype(np.float32), "w2.z": np.zeros(10, np.int8),
        "b2": rng.normal(0, 0.1, 10).astype(np.float32), "alpha2": np.float32(0.9), "a2.s": np.float32(0.3),
        "w3": (2 * rng.integers(0, 4, (6, 10, 3, 3)) - 3).astype(np.int8),
        "w3.s": rng.uniform(0.05, 0.1, 6).astype(np.float32), "w3.z": np.zeros(6, np.int8),
        "y.s": np.float32(0.05), "y.z": np.uint8(0),
    }
    n = helper.make_node
    nodes = [
        n("QuantizeLinear", ["x", "x.s", "x.z"], ["xq"]), n("DequantizeLinear", ["xq", "x.s", "x.z"], ["xd"]),
        n("DequantizeLinear", ["w1", "w1.s", "w1.z"], ["w1d"], axis=0),
        n("Conv", ["xd", "w1d"], ["c1"], pads=[1, 1, 1, 1]),
        n("Clip", ["c1", "lo", "alpha"], ["a"], name="pact"),
        n("QuantizeLinear", ["a", "a.s", "a.z"], ["aq"]), n("DequantizeLinear", ["aq", "a.s", "a.z"], ["ad"]),
        n("DequantizeLinear", ["w2", "w2.s", "w2.z"], ["w2d"], axis=0),
        n("Conv", ["ad", "w2d", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        n("Clip", ["c2", "lo", "alpha2"], ["a2"], name="pact2"),
        n("QuantizeLinear", ["a2", "a2.s", "a.z"], ["a2q"]), n("DequantizeLinear", ["a2q", "a2.s", "a.z"], ["a2d"]),
        n("DequantizeLinear", ["w3", "w3.s", "w3.z"], ["w3d"], axis=0),
        n("Conv", ["a2d", "w3d"], ["c3"], pads=[1, 1, 1, 1]),
        n("Relu", ["c3"], ["r3"]),
        n("QuantizeLinear", ["r3", "y.s", "y.z"], ["yq"]), n("DequantizeLinear", ["yq", "y.s", "y.z"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "qat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 5, 5])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), alpha


def test_qat_exported_pact_sawb_model_builds_to_bit_serial(tmp_path):
    from relay_passes.quantize import pact

    model, alpha = _qat_model()
    clips = pact.find_pact_clips(model)
    assert [(c.alpha, c.bits) for c in clips] == [(pytest.approx(alpha), 2), (pytest.approx(0.9), 2)]
    realized = realize_onnx(model, "uint8")
    assert len(_bitserial_weights(realized)) == 2
    assert not any("requantize" in gv.name_hint for gv in realized.functions)  # 2-bit codes flow straight through
    artifact = edgeq.build(model, "host", tmp_path / "qat")
    x = np.random.default_rng(1).normal(0.3, 1.0, (1, 3, 9, 9)).astype(np.float32)
    ours = artifact.run({"x": x})["y"]
    oracle = ort_outputs(model, {"x": x})[0]
    # integer kernels vs onnxruntime's float fake quant: the same codes up to a rounding tie (one output step)
    assert np.abs(ours - oracle).max() <= 0.05 * 1.001
    assert np.mean(ours == oracle) > 0.97 and np.unique(ours).size > 5  # measured: all equal, 24 distinct values


def _residual_model() -> onnx.ModelProto:
    """A small ResNet: stem conv, a block with a 1x1 stride-2 downsample shortcut, a block with an identity
    shortcut (conv-relu-conv + shortcut, then relu), global pool, gemm."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def conv(name, x, cin, cout, k=3, stride=1, relu=True):
        w = rng.standard_normal((cout, cin, k, k)) * np.sqrt(2 / (cin * k * k))
        inits.extend([numpy_helper.from_array(w.astype(np.float32), f"{name}.w"),
                      numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), f"{name}.b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name, kernel_shape=[k, k],
                                      strides=[stride] * 2, pads=[k // 2] * 4))
        return _relu(name) if relu else name

    def _relu(x):
        nodes.append(helper.make_node("Relu", [x], [f"{x}.relu"], name=f"{x}.relu"))
        return f"{x}.relu"

    def add(name, a, b):
        nodes.append(helper.make_node("Add", [a, b], [name], name=name))
        return _relu(name)

    h = conv("stem", "x", 3, 8)
    h = add("add1", conv("b1.conv2", conv("b1.conv1", h, 8, 16, stride=2), 16, 16, relu=False),
            conv("b1.downsample", h, 8, 16, k=1, stride=2, relu=False))
    h = add("add2", conv("b2.conv2", conv("b2.conv1", h, 16, 16), 16, 16, relu=False), h)
    inits.append(numpy_helper.from_array((rng.standard_normal((10, 16)) * 0.3).astype(np.float32), "fc.w"))
    nodes += [helper.make_node("GlobalAveragePool", [h], ["pool"], name="pool"),
              helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
              helper.make_node("Gemm", ["flat", "fc.w"], ["out"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "resnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_fpsc_keeps_the_shortcuts_8bit_and_matches_onnxruntime(cli, tmp_path):
    model, rng = _residual_model(), np.random.default_rng(0)
    calib = {"x": rng.standard_normal((16, 3, 12, 12)).astype(np.float32)}
    plain = {g["node"]: g for g in edgeq.quantize(model, calib, mode="w2a2").summary()["quantized_layers"]}
    assert plain["b1.downsample"]["weight_bits"] == 2 and plain["add1"]["output_bits"] == 2  # without fpsc: 2-bit
    onnx.save(model, tmp_path / "resnet.onnx")
    np.savez(tmp_path / "calib.npz", **calib)
    code, _, err = cli("compile", tmp_path / "resnet.onnx", "--quantize", "w2a2", "--fpsc", "--calib",
                       tmp_path / "calib.npz", "-o", tmp_path / "fpsc")
    assert code == 0, err
    artifact = edgeq.Artifact.load(tmp_path / "fpsc")
    q = artifact.manifest["quantization"]
    layers = {g["node"]: g for g in q["quantized_layers"]}
    assert q["fpsc"] is True
    assert "weight_bits" not in layers["b1.downsample"]  # the shortcut conv keeps 8-bit weights
    assert all(layers[n]["weight_bits"] == 2 for n in ("b1.conv1", "b1.conv2", "b2.conv1", "b2.conv2"))
    # 8-bit activations at the fork (the stem's output) and out of both Adds; the blocks' inner ReLUs stay 2-bit
    assert not any("output_bits" in layers[n] for n in ("stem", "add1", "add2"))
    assert layers["b1.conv1"]["output_bits"] == layers["b2.conv1"]["output_bits"] == 2
    assert "b1.downsample" in q["weights_by_precision"]["int8"]["layers"]
    qdq = onnx.load(tmp_path / "fpsc" / QUANTIZED_MODEL)
    xs = rng.standard_normal((100, 1, 3, 12, 12)).astype(np.float32)
    ours = np.concatenate([artifact.run({"x": x})["out"] for x in xs])
    oracle = np.concatenate([ort_outputs(qdq, {"x": x})[0] for x in xs])
    np.testing.assert_array_equal(ours, oracle)  # integer kernels, bit-exact with onnxruntime's QDQ
