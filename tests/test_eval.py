"""`edgeq eval`: the numbers it reports equal independent computations, and bad input is refused clearly."""

import json

import numpy as np
import onnx
import pytest
from conftest import ort_outputs

import edgeq
from edgeq.demo import DIGITS_CALIB, DIGITS_MODEL, DIGITS_TEST
from edgeq.errors import EdgeqError
from edgeq.report import evaluate


@pytest.fixture(scope="module")
def int8_digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "int8"
    return edgeq.build(DIGITS_MODEL, "host", out, input_shapes={"image": (1, 1, 8, 8)}, quantize="int8",
                       calibration=DIGITS_CALIB)


@pytest.fixture(scope="module")
def test_set():
    with np.load(DIGITS_TEST) as data:
        return data["image"][:96], data["label"][:96]


def test_report_matches_independent_computations(int8_digits, test_set):
    images, labels = test_set
    report = evaluate(int8_digits.path, {"image": images, "label": labels}, labels="label", per_layer_samples=32)
    fp32 = ort_outputs(onnx.load(DIGITS_MODEL), {"image": images})[0]
    int8 = np.concatenate([int8_digits.run({"image": x[None]})["logits"] for x in images])
    assert report["samples"] == 96 and report["int8_source"] == "artifact"
    assert report["accuracy"]["fp32"] == pytest.approx(np.mean(fp32.argmax(1) == labels))
    assert report["accuracy"]["int8"] == pytest.approx(np.mean(int8.argmax(1) == labels))
    assert report["top1_agreement"] == pytest.approx(np.mean(fp32.argmax(1) == int8.argmax(1)))
    sqnr = 10 * np.log10(np.sum(fp32.astype(np.float64) ** 2) / np.sum((fp32.astype(np.float64) - int8) ** 2))
    assert report["outputs"][0]["sqnr_db"] == pytest.approx(sqnr, abs=0.05)
    layers = report["layers"]
    assert [row["node"] for row in layers] == [g["node"] for g in int8_digits.manifest["quantization"]["quantized_layers"]]
    assert all(np.isfinite(row["sqnr_db"]) for row in layers)
    worst = min(layers, key=lambda row: row["sqnr_db"])
    assert report["worst_layer"] == worst["node"] and [row["worst"] for row in layers].count(True) == 1


def test_cli_writes_plot_and_json(cli, int8_digits, tmp_path):
    code, out, err = cli("eval", int8_digits.path, "--data", DIGITS_TEST, "--labels", "label",
                         "--plot", tmp_path / "p.png", "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "<- worst" in out and "SQNR" in out
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples"] == 360 and report["accuracy"]["int8"] >= 0.98


def test_bad_input_is_refused(cli, int8_digits, tmp_path, test_set):
    images, _ = test_set
    np.savez(tmp_path / "wrong.npz", image=np.zeros((4, 1, 9, 9), np.float32))
    code, _, err = cli("eval", int8_digits.path, "--data", tmp_path / "wrong.npz")
    assert code == 2 and "'image'" in err and "[1, 1, 8, 8]" in err
    code, _, err = cli("eval", int8_digits.path, "--data", DIGITS_TEST, "--labels", "y")
    assert code == 2 and "labels 'y' not found" in err
    fp32 = edgeq.build(DIGITS_MODEL, "host", tmp_path / "fp32", input_shapes={"image": (1, 1, 8, 8)})
    with pytest.raises(EdgeqError, match="not quantized"):
        evaluate(fp32.path, {"image": images})
