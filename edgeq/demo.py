"""`edgeq demo`: the bundled digits CNN compiled for this machine, tested and timed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).parent / "examples"
DIGITS_MODEL = EXAMPLES / "digits_cnn.onnx"
DIGITS_TEST = EXAMPLES / "digits_test.npz"
DIGITS_CALIB = EXAMPLES / "digits_calib.npz"  # training-split images for int8 calibration


def digits_accuracy(artifact, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of a batch-1 digits artifact over a test set."""
    name = artifact.inputs[0].name
    predictions = [int(np.argmax(next(iter(artifact.run({name: img[None]}).values())))) for img in images]
    return float(np.mean(np.array(predictions) == labels))


def _onnxruntime_comparison(artifact, edgeq_ms: float) -> str:
    """', onnxruntime X us (ratio)' when onnxruntime is installed (it is a test extra), else ''."""
    try:
        import onnxruntime as ort
    except ImportError:
        return ""
    session = ort.InferenceSession(str(DIGITS_MODEL), providers=["CPUExecutionProvider"])
    feed = {artifact.inputs[0].name: np.zeros(artifact.inputs[0].shape, np.float32)}
    session.run(None, feed)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.3:
        session.run(None, feed)
        runs += 1
    ort_ms = (time.perf_counter() - start) / runs * 1e3
    return f"; onnxruntime {ort_ms * 1e3:.1f} us mean (edgeq/onnxruntime {edgeq_ms / ort_ms:.2f}x)"


def run_demo(out_dir: str | None = None) -> dict:
    """fp32 and int8 builds of the digits CNN: accuracy on the held-out set, latency, size."""
    from . import build
    from .tensors import load_arrays

    test = load_arrays(DIGITS_TEST)
    shapes = {"image": (1, 1, 8, 8)}
    start = time.perf_counter()
    artifact = build(DIGITS_MODEL, target="host", out_dir=out_dir, input_shapes=shapes, progress=True)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    int8 = build(DIGITS_MODEL, target="host", out_dir=None if out_dir is None else f"{out_dir}-int8",
                 input_shapes=shapes, progress=True, quantize="int8", calibration=DIGITS_CALIB)
    int8_s = time.perf_counter() - start
    accuracy = digits_accuracy(artifact, test["image"], test["label"])
    int8_accuracy = digits_accuracy(int8, test["image"], test["label"])
    latency = artifact.benchmark(repeat=30)
    int8_latency = int8.benchmark(repeat=30)
    m = artifact.manifest
    weights = {kind: sum(a.manifest["quantization"]["weight_bytes"].values()) for kind, a in
               (("fp32", artifact), ("int8", int8))}
    report = {"accuracy": accuracy, "int8_accuracy": int8_accuracy, "latency_ms": latency["mean_ms"],
              "int8_latency_ms": int8_latency["mean_ms"], "compile_s": compile_s,
              "library_bytes": artifact.size_bytes(), "onnx_bytes": DIGITS_MODEL.stat().st_size,
              "weight_bytes": weights["fp32"], "int8_weight_bytes": weights["int8"]}
    print(f"edgeq demo: digits CNN (scikit-learn digits, 8x8 grayscale) on {m['preset']} "
          f"({m['target'].get('mcpu', m['arch'])}, {latency['threads']} threads)")
    print(f"  compiled  in {compile_s:.1f} s -> {artifact.path}; int8 (calibrated on "
          f"{len(load_arrays(DIGITS_CALIB)['image'])} training images) in {int8_s:.1f} s -> {int8.path}")
    print(f"  accuracy  {accuracy:.2%} top-1 on {len(test['label'])} held-out test images; int8 {int8_accuracy:.2%}")
    print(f"  latency   {latency['mean_ms'] * 1e3:.1f} us mean, {latency['min_ms'] * 1e3:.1f} us min (batch 1)"
          + _onnxruntime_comparison(artifact, latency["mean_ms"])
          + f"; int8 {int8_latency['mean_ms'] * 1e3:.1f} us mean")
    print(f"  size      ONNX {report['onnx_bytes'] / 1e3:.1f} KB, weights fp32 {weights['fp32'] / 1e3:.1f} KB, "
          f"int8 {weights['int8'] / 1e3:.1f} KB; artifact {report['library_bytes'] / 1e3:.1f} KB")
    return report
