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
    from . import build
    from .tensors import load_arrays

    test = load_arrays(DIGITS_TEST)
    start = time.perf_counter()
    artifact = build(DIGITS_MODEL, target="host", out_dir=out_dir, input_shapes={"image": (1, 1, 8, 8)},
                     progress=True)
    compile_s = time.perf_counter() - start
    accuracy = digits_accuracy(artifact, test["image"], test["label"])
    latency = artifact.benchmark(repeat=30)
    m = artifact.manifest
    report = {"accuracy": accuracy, "latency_ms": latency["mean_ms"], "compile_s": compile_s,
              "library_bytes": artifact.size_bytes(), "onnx_bytes": DIGITS_MODEL.stat().st_size,
              "weight_bytes": sum(m["quantization"]["weight_bytes"].values())}
    print(f"edgeq demo: digits CNN (scikit-learn digits, 8x8 grayscale) on {m['preset']} "
          f"({m['target'].get('mcpu', m['arch'])}, {latency['threads']} threads)")
    print(f"  compiled  in {compile_s:.1f} s -> {artifact.path}")
    print(f"  accuracy  {accuracy:.2%} top-1 on {len(test['label'])} held-out test images")
    print(f"  latency   {latency['mean_ms'] * 1e3:.1f} us mean, {latency['min_ms'] * 1e3:.1f} us min (batch 1)"
          + _onnxruntime_comparison(artifact, latency["mean_ms"]))
    print(f"  size      ONNX {report['onnx_bytes'] / 1e3:.1f} KB, fp32 weights {report['weight_bytes'] / 1e3:.1f} KB, "
          f"artifact {report['library_bytes'] / 1e3:.1f} KB")
    return report
