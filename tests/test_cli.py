"""The command line: each command works, bad input exits 2 with one line, bugs exit 1."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import zoo
from conftest import ort_outputs

import edgeq.cli


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "dyn.onnx"
    onnx.save(zoo.dynamic_batch_model(), path)
    return path


@pytest.fixture(scope="module")
def artifact_dir(model_file):
    out = model_file.parent / "art"
    assert edgeq.cli.main(["compile", str(model_file), "-o", str(out), "--input-shape", "x=2x3x16x16"]) == 0
    return out


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgeq: error: "), err
    return lines[0]


def test_compile_run_matches_onnxruntime(cli, artifact_dir, model_file, tmp_path):
    inputs = zoo.random_inputs(onnx.load(model_file), shapes={"x": [2, 3, 16, 16]})
    np.savez(tmp_path / "in.npz", **inputs)
    code, out, err = cli("run", artifact_dir, "--input", tmp_path / "in.npz", "-o", tmp_path / "out.npz")
    assert code == 0, err
    assert "out: float32[2, 10]" in out
    with np.load(tmp_path / "out.npz") as saved:
        np.testing.assert_allclose(saved["out"], ort_outputs(onnx.load(model_file), inputs)[0], rtol=1e-4, atol=1e-5)


def test_bench(cli, artifact_dir):
    code, out, _ = cli("bench", artifact_dir, "--repeat", "3", "--threads", "1", "--threads", "2")
    assert code == 0
    rows = [line.split() for line in out.splitlines()[3:]]
    assert [r[0] for r in rows] == ["1", "2"] and all(float(r[1]) > 0 for r in rows)


def test_inspect_model_and_artifact(cli, model_file, artifact_dir):
    code, out, _ = cli("inspect", model_file)
    assert code == 0 and "input  x: float32['batch', 3, 16, 16]" in out and "unsupported: none" in out
    assert "output out: float32['batch', 10]" in out
    code, out, _ = cli("inspect", artifact_dir)
    assert code == 0 and "checksums ok" in out and "input   x: float32[2, 3, 16, 16]" in out


def test_targets_lists_presets_and_toolchains(cli):
    code, out, _ = cli("targets")
    assert code == 0
    for name in ("host", "rpi4", "rpi5", "rpi3-32", "android-arm64", "jetson-orin", "cuda-sm90"):
        assert f"\n{name} " in out
    assert "toolchain here" in out


@pytest.mark.parametrize("args, message", [
    (["compile", "missing.onnx", "-o", "x"], "no such file"),
    (["compile", "{model}", "-o", "{tmp}/o"], "dynamic input dims"),
    (["compile", "{model}", "-o", "{tmp}/o", "--input-shape", "x=2by3"], "bad shape"),
    (["compile", "{model}", "-o", "{tmp}/o", "--input-shape", "x=2x3x16x16", "--target", "rpi9"], "unknown target"),
    (["compile", "{model}", "-o", "{tmp}/o", "--quantize", "int8", "--fpsc"], "--fpsc applies to the low-bit modes"),
    (["compile", "{unsupported}", "-o", "{tmp}/o"], "unsupported ONNX operators: Celu"),
    (["run", "{tmp}"], "not an edgeq artifact"),
    (["run", "{artifact}", "--input", "{tmp}/nothing.npz"], "cannot read arrays"),
    (["inspect", "{tmp}/nothing"], "no such file or directory"),
])
def test_bad_input_exits_2_with_one_line(cli, args, message, model_file, artifact_dir, tmp_path):
    unsupported = tmp_path / "unsupported.onnx"
    onnx.save(zoo.unsupported_ops_model(), unsupported)
    args = [a.format(model=model_file, tmp=tmp_path, artifact=artifact_dir, unsupported=unsupported) for a in args]
    code, _, err = cli(*args)
    assert code == 2
    assert message in one_line_error(err)


def test_wrong_input_shape_for_run(cli, artifact_dir, tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((1, 3, 16, 16), np.float32))
    code, _, err = cli("run", artifact_dir, "--input", tmp_path / "bad.npz")
    assert code == 2 and "input 'x' has shape [1, 3, 16, 16], expected [2, 3, 16, 16]" in one_line_error(err)


def test_corrupt_artifact_exits_2(cli, artifact_dir, tmp_path):
    import shutil

    broken = shutil.copytree(artifact_dir, tmp_path / "broken")
    with open(broken / "model.so", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    code, _, err = cli("run", broken)
    assert code == 2 and "checksum mismatch for model.so" in one_line_error(err)


def test_internal_error_exits_1_and_verbose_shows_traceback(cli, artifact_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(edgeq.cli, "cmd_inspect", broken)
    code, _, err = cli("inspect", artifact_dir)
    assert code == 1 and "internal error: RuntimeError: simulated bug" in err and "Traceback" not in err
    code, _, err = cli("--verbose", "inspect", artifact_dir)
    assert code == 1 and "Traceback" in err


def test_usage_error_exits_2(cli):
    with pytest.raises(SystemExit) as info:
        cli("compile")
    assert info.value.code == 2


def test_console_script_exit_codes(tmp_path):
    edgeq_bin = [sys.executable, "-m", "edgeq.cli"]
    ok = subprocess.run(edgeq_bin + ["targets"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "rpi4" in ok.stdout
    bad = subprocess.run(edgeq_bin + ["run", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("edgeq: error:")


def test_inspect_lists_unsupported_ops(cli, tmp_path):
    path = tmp_path / "unsupported.onnx"
    onnx.save(zoo.unsupported_ops_model(), path)
    code, out, _ = cli("inspect", path)
    assert code == 0 and "unsupported: LpNormalization (lpnorm_a, lpnorm_b); Celu (celu_c)" in out


@pytest.mark.slow
def test_ctrl_c_during_compile_exits_130_and_leaves_nothing(tmp_path):
    import signal
    import time

    from edgeq import zoo

    # int8: calibration + two compiles (~17 s here), so the signal lands well inside the work
    onnx.save(zoo.mobilenet_v2(), tmp_path / "mbv2.onnx")
    np.savez(tmp_path / "calib.npz", input=np.random.default_rng(0).standard_normal((16, 3, 224, 224), np.float32))
    proc = subprocess.Popen([sys.executable, "-m", "edgeq.cli", "compile", str(tmp_path / "mbv2.onnx"),
                             "--quantize", "int8", "--calib", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "out")],
                            stderr=subprocess.PIPE, text=True)
    time.sleep(8)
    assert proc.poll() is None, "compile finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().endswith("edgeq: interrupted"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "mbv2.onnx"]


def test_ctrl_c_inside_a_tvm_pass_stays_an_interrupt():
    """TVM wraps a KeyboardInterrupt raised in a Python pass as a RuntimeError; the interrupt must survive that."""
    import os
    import signal

    import tvm

    from edgeq.errors import interruptible, raise_if_interrupted

    @tvm.transform.module_pass(opt_level=0)
    def interrupted_pass(mod, ctx):
        os.kill(os.getpid(), signal.SIGINT)  # the handler raises here, inside C++'s call of this pass
        return mod

    @tvm.transform.module_pass(opt_level=0)
    def checking_pass(mod, ctx):
        try:
            return interrupted_pass(mod)
        except Exception:  # what schedule code that tolerates failures does
            raise_if_interrupted()
            raise

    with pytest.raises(KeyboardInterrupt):
        with interruptible():
            tvm.transform.Sequential([checking_pass])(tvm.IRModule())


def test_substitute_reports_and_compile_substitute_keeps_outputs(cli, tmp_path):
    import json

    from edgeq.demo import DIGITS_MODEL

    code, out, err = cli("substitute", DIGITS_MODEL, "--input-shape", "image=1x1x8x8", "--cost", "analytic",
                         "--report")
    assert code == 0, err
    assert "graph substitution: cost" in out and "conv_act" in out and "verified on random inputs: yes" in out
    code, _, err = cli("compile", DIGITS_MODEL, "--input-shape", "image=4x1x8x8", "--substitute", "--cost",
                       "analytic", "-o", tmp_path / "art")
    assert code == 0, err
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["substitution"]["applied"] and manifest["substitution"]["verified"]
    with np.load(Path(DIGITS_MODEL).parent / "digits_test.npz") as data:
        images = data["image"][:4]
    np.savez(tmp_path / "x.npz", image=images)
    code, _, err = cli("run", tmp_path / "art", "--input", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert code == 0, err
    (expected,) = ort_outputs(onnx.load(DIGITS_MODEL), {"image": images})
    with np.load(tmp_path / "y.npz") as got:
        np.testing.assert_allclose(next(iter(got.values())), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_w2a2_compile_and_eval_report_bits_per_layer(cli, tmp_path):
    from edgeq.demo import DIGITS_CALIB, DIGITS_MODEL, DIGITS_TEST

    code, out, err = cli("compile", DIGITS_MODEL, "--input-shape", "image=1x1x8x8", "--quantize", "w2a2",
                         "--calib", DIGITS_CALIB, "-o", tmp_path / "w2a2")
    assert code == 0 and "w2a2" in out, err
    code, out, err = cli("inspect", tmp_path / "w2a2")  # weights as stored: the middle conv's 2 bits a weight
    assert code == 0 and "2-bit packed 1.2 KB (1/16.0 of their fp32 18.4 KB)" in out, out
    code, out, err = cli("eval", tmp_path / "w2a2", "--data", DIGITS_TEST, "--labels", "label")
    assert code == 0, err
    assert "accuracy      fp32 99.17%, w2a2 9" in out  # 96.1 % here: within a few points of fp32
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("/")}
    assert "w8 out2" in rows["/0/Conv"]  # the first conv keeps 8-bit weights and writes 2-bit PACT codes
    assert "w2 out8" in rows["/4/Conv"]  # the middle conv: 2-bit weights on those codes (W2A2)
    assert "w8 out8" in rows["/9/Gemm"]  # the last layer stays 8-bit
