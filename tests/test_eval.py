"""`edgeq eval`: what quantization cost, checked against independent runs (onnxruntime, the artifact itself)."""

import dataclasses
import json
import math
import shutil
import sys

import numpy as np
import onnx
import pytest
from conftest import ort_outputs
from onnx import numpy_helper

import edgeq
from edgeq.demo import DIGITS_CALIB, DIGITS_MODEL, DIGITS_TEST
from edgeq.report import evaluate, format_report

SHAPES = {"image": (1, 1, 8, 8)}


@pytest.fixture(scope="module")
def test_set():
    with np.load(DIGITS_TEST) as data:
        return data["image"], data["label"]


@pytest.fixture(scope="module")
def quantized():
    return edgeq.quantize(DIGITS_MODEL, DIGITS_CALIB, input_shapes=SHAPES)  # training images, not the test set


@pytest.fixture(scope="module")
def int8_dir(quantized, tmp_path_factory):
    return edgeq.build(quantized, "host", tmp_path_factory.mktemp("eval") / "int8").path


@pytest.fixture(scope="module")
def report(int8_dir):
    return evaluate(int8_dir, DIGITS_TEST, labels="label")


@pytest.mark.slow  # the module's int8 build (~20 s) comes first
def test_accuracy_and_agreement_match_independent_runs(report, int8_dir, test_set):
    images, labels = test_set
    fp32 = ort_outputs(onnx.load(DIGITS_MODEL), {"image": images})[0].astype(np.float64)
    artifact = edgeq.Artifact.load(int8_dir)
    int8 = np.concatenate([artifact.run({"image": x[None]})["logits"] for x in images])
    fp32_top, int8_top = fp32.argmax(1), int8.argmax(1)
    assert report["samples"] == len(images) and report["dropped"] == 0 and report["int8_source"] == "artifact"
    assert report["accuracy"] == {"labels": "label", "fp32": np.mean(fp32_top == labels),
                                  "int8": np.mean(int8_top == labels)}
    assert 0 <= report["top1_agreement"] <= 1
    assert report["top1_agreement"] == np.mean(fp32_top == int8_top)
    [out] = report["outputs"]
    assert out["name"] == "logits" and out["sqnr_db"] > 20
    assert out["sqnr_db"] == pytest.approx(10 * np.log10(np.sum(fp32**2) / np.sum((fp32 - int8) ** 2)), abs=0.05)
    assert out["max_abs_error"] == pytest.approx(np.max(np.abs(fp32 - int8)), abs=1e-4)


@pytest.mark.slow  # the module's int8 build (~20 s) comes first
def test_per_layer_table_has_one_finite_row_per_quantized_layer(report, int8_dir):
    layers = edgeq.Artifact.load(int8_dir).manifest["quantization"]["quantized_layers"]
    rows = report["layers"]
    assert [r["node"] for r in rows] == [g["node"] for g in layers]
    assert [r["tensor"] for r in rows] == [g["output"] for g in layers]
    assert all(math.isfinite(r["sqnr_db"]) for r in rows)
    worst = [r for r in rows if r["worst"]]
    assert len(worst) == 1 and worst[0]["sqnr_db"] == min(r["sqnr_db"] for r in rows)
    assert report["worst_layer"] == worst[0]["node"] and report["layer_samples"] == 64
    # the last layer's tap is the model output: same SQNR as the full-set figure, give or take the sample count
    assert abs(rows[-1]["sqnr_db"] - report["outputs"][0]["sqnr_db"]) < 3
    text = format_report(report)
    assert "<- worst" in text and "first 64 of 360 samples" in text and "agreement" in text


@pytest.mark.slow
def test_a_coarsely_quantized_layer_is_marked_worst(report, quantized, tmp_path):
    damaged = onnx.ModelProto.FromString(quantized.qdq.SerializeToString())
    [scale] = [t for t in damaged.graph.initializer if t.name == "logits.scale"]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(20), scale.name))
    artifact = edgeq.build(dataclasses.replace(quantized, qdq=damaged), "host", tmp_path / "damaged")
    got = evaluate(artifact.path, DIGITS_TEST)
    before, after = report["layers"], got["layers"]
    assert got["worst_layer"] == after[-1]["node"] == "/9/Gemm" and after[-1]["worst"]
    assert after[-1]["sqnr_db"] < before[-1]["sqnr_db"] - 10
    assert got["outputs"][0]["sqnr_db"] < report["outputs"][0]["sqnr_db"] - 10  # the artifact ran damaged too
    for b, a in zip(before[:-1], after[:-1]):  # layers upstream of the damage are untouched
        assert a["sqnr_db"] == pytest.approx(b["sqnr_db"], abs=1e-6) and not a["worst"]


@pytest.mark.slow
def test_foreign_artifact_is_compared_through_its_host_realization(report, int8_dir, tmp_path):
    foreign = tmp_path / "foreign"
    shutil.copytree(int8_dir, foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    (foreign / "manifest.json").write_text(json.dumps({**manifest, "arch": "riscv64"}))  # not checksummed
    got = evaluate(foreign, DIGITS_TEST, labels="label", per_layer_samples=8)
    assert got["int8_source"] == "host"
    assert any("realized for this machine" in n and "riscv64" in n for n in got["notes"])
    assert got["layer_samples"] == 8
    assert got["accuracy"] == report["accuracy"] and got["top1_agreement"] == report["top1_agreement"]
    assert got["outputs"][0]["sqnr_db"] == pytest.approx(report["outputs"][0]["sqnr_db"], abs=0.01)


@pytest.mark.slow
def test_cli_prints_the_table_and_writes_plot_and_json(cli, int8_dir, tmp_path):
    png, report_json = tmp_path / "p.png", tmp_path / "r.json"
    code, out, err = cli("eval", int8_dir, "--data", DIGITS_TEST, "--labels", "label", "--plot", png,
                         "--json", report_json)
    assert code == 0, err
    assert "top-1" in out and "accuracy" in out and "<- worst" in out and "SQNR dB" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(report_json.read_text())
    assert data["accuracy"]["labels"] == "label" and len(data["layers"]) == 5
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def _error(cli, *args) -> str:
    code, out, err = cli("eval", *args)
    assert code == 2 and err.startswith("edgeq: error: ") and err.count("\n") == 1, (code, err)
    return err


def test_fp32_artifact_has_nothing_to_compare(cli, tmp_path):
    fp32 = edgeq.build(DIGITS_MODEL, "host", tmp_path / "fp32", input_shapes=SHAPES)
    assert "is not quantized (mode fp32): nothing to compare" in _error(cli, fp32.path, "--data", DIGITS_TEST)


@pytest.mark.slow  # the module's int8 build (~20 s) comes first
def test_bad_data_and_labels_are_one_line_errors(cli, int8_dir, tmp_path):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=np.zeros((4, 1, 4, 4), np.float32))
    err = _error(cli, int8_dir, "--data", wrong)
    assert "'image'" in err and "[1, 1, 8, 8]" in err and "calibration" not in err
    other = tmp_path / "other.npz"
    np.savez(other, pixels=np.zeros((4, 1, 8, 8), np.float32))
    assert "image" in _error(cli, int8_dir, "--data", other)
    err = _error(cli, int8_dir, "--data", DIGITS_TEST, "--labels", "target")
    assert "'target'" in err and "image, label" in err
    short = tmp_path / "short.npz"
    np.savez(short, image=np.zeros((4, 1, 8, 8), np.float32), label=np.zeros(3, np.int64))
    assert "3 entries for 4 samples" in _error(cli, int8_dir, "--data", short, "--labels", "label")


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(edgeq.EdgeqError, match=r"pip install 'edgeq\[plot\]'"):
        evaluate(tmp_path / "any", DIGITS_TEST, plot=tmp_path / "p.png")  # checked before anything else
