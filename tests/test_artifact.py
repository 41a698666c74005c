"""Artifacts: manifest contents, refusal of corrupt or mismatched ones, atomic writes, run/benchmark."""

import importlib
import json

import numpy as np
import pytest
import zoo

import edgeq
from edgeq import EdgeqError
from edgeq.artifact import MANIFEST, sha256_file

build_module = importlib.import_module("edgeq.build")  # the module, not the edgeq.build function


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return edgeq.build(zoo.ZOO["add"](), "host", tmp_path_factory.mktemp("a") / "add")


@pytest.fixture
def copy(built, tmp_path):
    import shutil

    return shutil.copytree(built.path, tmp_path / "copy")


def test_manifest_describes_the_build(built):
    m = json.loads((built.path / MANIFEST).read_text())
    assert m["format"] == "edgeq-artifact" and m["format_version"] == 1
    assert m["preset"] == "host" and m["target"]["kind"] == "llvm"
    assert m["library"] == {"file": "model.so", "kind": "shared", "linker": m["library"]["linker"]}
    assert m["inputs"] == [{"name": "x", "shape": [1, 8, 12, 12], "dtype": "float32"},
                           {"name": "y", "shape": [8, 1, 1], "dtype": "float32"}]
    assert m["outputs"] == [{"name": "out", "shape": [1, 8, 12, 12], "dtype": "float32"}]
    assert m["quantization"]["mode"] == "fp32"
    assert m["files"] == {"model.so": sha256_file(built.path / "model.so"),
                          "source.onnx": m["model"]["sha256"]}
    assert {p.name for p in built.path.iterdir()} == {"model.so", "source.onnx", MANIFEST}


def test_corrupted_library_is_refused(copy):
    lib = copy / "model.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(EdgeqError, match="corrupt: checksum mismatch for model.so"):
        edgeq.Artifact.load(copy)


def test_missing_library_is_refused(copy):
    (copy / "model.so").unlink()
    with pytest.raises(EdgeqError, match="incomplete: model.so is missing"):
        edgeq.Artifact.load(copy)


def test_truncated_manifest_is_refused(copy):
    manifest = copy / MANIFEST
    manifest.write_text(manifest.read_text()[:50])
    with pytest.raises(EdgeqError, match="unreadable or corrupt"):
        edgeq.Artifact.load(copy)


def test_other_format_version_is_refused(copy):
    manifest = copy / MANIFEST
    m = json.loads(manifest.read_text())
    m["format_version"] = 99
    manifest.write_text(json.dumps(m))
    with pytest.raises(EdgeqError, match="format version 99"):
        edgeq.Artifact.load(copy)


def test_not_an_artifact(tmp_path):
    with pytest.raises(EdgeqError, match="not an edgeq artifact"):
        edgeq.Artifact.load(tmp_path)


def test_interrupted_build_leaves_no_artifact(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        edgeq.build(zoo.ZOO["relu"](), "host", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_rebuild_keeps_the_previous_artifact(built, copy, monkeypatch):
    before = (copy / MANIFEST).read_text()
    monkeypatch.setattr(build_module, "_export", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        edgeq.build(zoo.ZOO["add"](), "host", copy)
    assert (copy / MANIFEST).read_text() == before
    assert sorted(p.name for p in copy.parent.iterdir()) == ["copy"]


def test_rebuild_replaces_an_artifact(copy):
    artifact = edgeq.build(zoo.ZOO["relu"](), "host", copy)
    assert artifact.manifest["model"]["name"] == "relu"


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(EdgeqError, match="not an edgeq artifact; refusing to overwrite"):
        edgeq.build(zoo.ZOO["relu"](), "host", tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_run_accepts_dict_list_and_checks_inputs(built):
    x = np.full((1, 8, 12, 12), 2.0, np.float32)
    y = np.arange(8, dtype=np.float32).reshape(8, 1, 1)
    np.testing.assert_array_equal(built.run({"x": x, "y": y})["out"], x + y)
    np.testing.assert_array_equal(built.run([x, y])["out"], x + y)
    with pytest.raises(EdgeqError, match="input 'y' has shape \\[8, 1\\], expected \\[8, 1, 1\\]"):
        built.run({"x": x, "y": y[..., 0]})
    with pytest.raises(EdgeqError, match="missing input"):
        built.run({"x": x})
    with pytest.raises(EdgeqError, match="unknown input"):
        built.run({"x": x, "y": y, "z": y})
    with pytest.raises(EdgeqError, match="dtype complex64"):
        built.run({"x": x, "y": y.astype(np.complex64)})


def test_benchmark_reports_statistics(built):
    stats = built.benchmark(repeat=3, min_repeat_ms=1, threads=1)
    assert stats["repeat"] == 3 and stats["threads"] == 1
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
