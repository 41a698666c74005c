"""The models users bring, as their own tools write them: torchvision architectures through both of torch.onnx's
exporters, and Ultralytics YOLOv8n through `YOLO(...).export(format="onnx")`. Each compiles and matches
onnxruntime; int8 builds quantize their convolutions into integer kernels that agree with onnxruntime running the
same QDQ model. (The full zoo, 20 architectures, with speed against onnxruntime: benchmarks/zoo.py.)"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import ecosystem
import edgeq
from conftest import ort_outputs, require_tool

pytestmark = pytest.mark.slow

REL_ERR = 1e-4  # fp32: edgeq vs onnxruntime, relative to the output's largest magnitude
# one of each kind of block (the benchmark zoo builds the rest): SE + hard-swish, SiLU + 5x5 depthwise, channel
# shuffle, grouped convs, LayerNorm + GELU, attention, shifted windows, a segmentation head
FP32 = ["mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5", "regnet_y_400mf", "convnext_small_width",
        "vit_small_width", "swin_small_width", "lraspp_mobilenet_v3_large"]
INT8 = ["mobilenet_v3_small", "regnet_y_400mf"]  # grouped convs + SE; SiLU int8: the YOLOv8n test
YOLO_SIZE = 256


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return tmp_path_factory.mktemp("ecosystem")


def _rel_err(ours: np.ndarray, oracle: np.ndarray) -> float:
    assert np.abs(oracle).max() > 0  # a comparison against all zeros proves nothing
    return float(np.abs(ours - oracle).max() / np.abs(oracle).max())


def _sqnr(signal: np.ndarray, noisy: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(signal ** 2) / max(np.sum((signal - noisy) ** 2), 1e-30)))


def _matches_onnxruntime(path, artifact, feeds) -> None:
    oracle = ort_outputs(onnx.load(path), feeds)
    ours = artifact.run(feeds)
    assert len(ours) == len(oracle)
    for got, want in zip(ours.values(), oracle):
        assert got.shape == want.shape and _rel_err(got, want) <= REL_ERR


@pytest.mark.parametrize("name", FP32)
def test_torchvision_architecture_compiles_and_matches_onnxruntime(name, exports, tmp_path):
    path, x = ecosystem.torchvision_model(name, exports)
    _matches_onnxruntime(path, edgeq.build(path, "host", tmp_path / "host"), {"x": x})


def test_torch_default_dynamo_exporter_output_compiles_and_matches(exports, tmp_path):
    """torch.onnx.export's default since torch 2.9 (opset 18, the model as an FX graph: other op forms)."""
    path, x = ecosystem.torchvision_model("mobilenet_v3_small", exports, dynamo=True)
    _matches_onnxruntime(path, edgeq.build(path, "host", tmp_path / "host"), {"x": x})


def _calibration(x: np.ndarray, uniform: bool = False) -> np.ndarray:
    rng = np.random.default_rng(1)
    shape = (8, *x.shape[1:])
    return (rng.uniform(0, 1, shape) if uniform else rng.standard_normal(shape)).astype(np.float32)


def _int8_agrees(path, feeds: dict, calibration: dict, tmp_path) -> edgeq.Artifact:
    """int8: every Conv quantized, the output within float rounding of onnxruntime on edgeq's QDQ model (the same
    integer grid; ties between two steps may round apart), and still the model (SQNR vs fp32)."""
    quantized = edgeq.quantize(path, calibration)
    artifact = edgeq.build(quantized, "host", tmp_path / "int8")
    quantized_ops = [g["op"] for g in artifact.manifest["quantization"]["quantized_layers"]]
    assert quantized_ops.count("Conv") == sum(n.op_type == "Conv" for n in quantized.source.onnx_model.graph.node)
    ours = next(iter(artifact.run(feeds).values()))
    assert _sqnr(ort_outputs(quantized.qdq, feeds)[0], ours) >= 35
    assert _sqnr(ort_outputs(onnx.load(path), feeds)[0], ours) >= 25
    return artifact


@pytest.mark.parametrize("name", INT8)
def test_torchvision_architecture_int8_quantizes_every_conv_and_agrees_with_onnxruntime(name, exports, tmp_path):
    path, x = ecosystem.torchvision_model(name, exports)
    _int8_agrees(path, {"x": x}, {"x": _calibration(x)}, tmp_path)


def test_swin_shape_arithmetic_folds_completely_and_its_matmuls_quantize(exports, tmp_path):
    """Swin-T's depths and windows (the stage-3 blocks at 14x14): onnxslim alone leaves 7 Shape nodes whose
    inputs ONNX's shape inference knows, and their symbolic dims used to break calibration; every matmul of the
    attention and MLP blocks is quantized, and the int8 output is onnxruntime's on the same QDQ model."""
    from edgeq.frontend import load_onnx

    path, x = ecosystem.torchvision_model("swin_t_width16", exports)
    assert not [n.name for n in load_onnx(path).onnx_model.graph.node if n.op_type == "Shape"]
    _matches_onnxruntime(path, edgeq.build(path, "host", tmp_path / "host"), {"x": x})
    quantized = edgeq.quantize(path, {"x": _calibration(x)})
    artifact = edgeq.build(quantized, "host", tmp_path / "int8")
    graph = quantized.source.onnx_model.graph
    weights = {t.name for t in graph.initializer}
    matmuls = {n.name: n.input[1] in weights for n in graph.node if n.op_type == "MatMul"}
    layers = {g["node"] for g in artifact.manifest["quantization"]["quantized_layers"]}
    floats = artifact.manifest["quantization"]["float_layers"]
    assert {m for m, by_weight in matmuls.items() if by_weight} <= layers
    assert all("both operands are activations" in floats[m] for m, by_weight in matmuls.items() if not by_weight)
    ours = next(iter(artifact.run({"x": x}).values()))
    # against onnxruntime's unfused run of the QDQ model (the float islands - softmax, GELU, LayerNorm - are
    # tables and fast-math kernels in edgeq): 31.3 dB measured on an AVX2 EPYC (Zen 1)
    assert _sqnr(ort_outputs(quantized.qdq, {"x": x})[0], ours) >= 30
    assert _sqnr(ort_outputs(onnx.load(path), {"x": x})[0], ours) >= 20


@pytest.fixture(scope="module")
def yolov8n(exports):
    return ecosystem.ultralytics_model("yolov8n.yaml", exports, YOLO_SIZE)


def test_yolov8n_as_ultralytics_exports_it_compiles_for_host_and_rpi4(yolov8n, tmp_path):
    """The export form: anchors and strides computed from the feature shapes, DFL softmax over box bins,
    boxes decoded and concatenated with the class sigmoids into one (1, 84, anchors) output."""
    path, x = yolov8n
    artifact = edgeq.build(path, "host", tmp_path / "host")
    assert list(artifact.outputs[0].shape) == [1, 84, sum((YOLO_SIZE // stride) ** 2 for stride in (8, 16, 32))]
    _matches_onnxruntime(path, artifact, {"images": x})
    require_tool("aarch64-linux-gnu-gcc")
    board = edgeq.build(path, "rpi4", tmp_path / "rpi4")
    assert board.manifest["arch"] == "aarch64" and board.manifest["library"]["kind"] == "shared"


def test_yolov8n_int8_quantizes_every_conv_and_agrees_with_onnxruntime(yolov8n, tmp_path):
    path, x = yolov8n
    _int8_agrees(path, {"images": x}, {"images": _calibration(x, uniform=True)}, tmp_path)
