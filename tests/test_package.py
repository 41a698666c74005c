"""`edgeq package`: the tarball holds a verified artifact and a runner that works with only numpy + TVM."""

import subprocess
import sys
import tarfile

import zoo

import edgeq


def test_package_runs_standalone(cli, tmp_path):
    artifact = edgeq.build(zoo.ZOO["conv"](), "host", tmp_path / "conv")
    code, out, err = cli("package", artifact.path, "-o", tmp_path / "conv.tar.gz")
    assert code == 0, err
    with tarfile.open(tmp_path / "conv.tar.gz") as tar:
        names = set(tar.getnames())
        tar.extractall(tmp_path / "device", filter="data")
    assert {"conv/model.so", "conv/manifest.json", "conv/source.onnx", "conv/run.py", "conv/DEVICE.md"} <= names
    readme = (tmp_path / "device/conv/DEVICE.md").read_text()
    assert "pip install numpy apache-tvm==" in readme and "no authentication" in readme
    run = subprocess.run([sys.executable, "run.py", "--repeat", "2"], cwd=tmp_path / "device/conv",
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "out: float32[1, 8, 8, 8]" in run.stdout and "latency:" in run.stdout
    (tmp_path / "device/conv/model.so").write_bytes(b"broken")
    run = subprocess.run([sys.executable, "run.py"], cwd=tmp_path / "device/conv", capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and "model.so is corrupt" in run.stderr
