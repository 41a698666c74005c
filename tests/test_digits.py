"""The bundled example: committed files are sound, edgeq keeps its accuracy and matches onnxruntime."""

import numpy as np
import onnx
import pytest
from conftest import ort_outputs

import edgeq
from edgeq.demo import DIGITS_MODEL, DIGITS_TEST, digits_accuracy


@pytest.fixture(scope="module")
def test_set():
    with np.load(DIGITS_TEST) as data:
        return data["image"], data["label"]


def test_bundled_files_are_small_and_valid(test_set):
    assert DIGITS_MODEL.stat().st_size <= 200_000
    onnx.checker.check_model(onnx.load(DIGITS_MODEL), full_check=True)
    images, labels = test_set
    assert images.shape == (360, 1, 8, 8) and images.dtype == np.float32
    assert sorted(np.unique(labels)) == list(range(10))


def test_edgeq_matches_onnxruntime_on_the_whole_test_set(test_set, tmp_path):
    images, labels = test_set
    artifact = edgeq.build(DIGITS_MODEL, "host", tmp_path / "batch", input_shapes={"image": images.shape})
    got = artifact.run({"image": images})["logits"]
    np.testing.assert_allclose(got, ort_outputs(onnx.load(DIGITS_MODEL), {"image": images})[0],
                               rtol=1e-4, atol=1e-5)
    assert np.mean(got.argmax(1) == labels) >= 0.98


@pytest.mark.slow
def test_demo_reports_accuracy_latency_and_size(cli, test_set, tmp_path):
    code, out, err = cli("demo", "-o", tmp_path / "demo")
    assert code == 0, err
    assert "accuracy  99.17% top-1 on 360" in out and "latency" in out and "size" in out
    artifact = edgeq.Artifact.load(tmp_path / "demo")
    assert digits_accuracy(artifact, *test_set) >= 0.98


@pytest.mark.slow
@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_int8_keeps_accuracy_with_every_calibration_method(method, test_set, tmp_path):
    """Calibrated on training images, evaluated on the held-out set: at most 0.2 points below fp32."""
    from edgeq.demo import DIGITS_CALIB

    images, labels = test_set
    fp32 = np.mean(ort_outputs(onnx.load(DIGITS_MODEL), {"image": images})[0].argmax(1) == labels)
    artifact = edgeq.build(DIGITS_MODEL, "host", tmp_path / method, input_shapes={"image": (1, 1, 8, 8)},
                           quantize="int8", calibration=DIGITS_CALIB, calib_method=method)
    assert artifact.manifest["quantization"]["method"] == method
    assert digits_accuracy(artifact, images, labels) >= fp32 - 0.002
