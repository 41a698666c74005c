"""End to end on an emulated Raspberry Pi 4 (qemu-user + the stock aarch64 TVM RPC server), through the CLI.

The first run builds the cached arm64 rootfs (about a minute, needs root for debootstrap), later runs restore
it; the server takes 10-30 s to import TVM under emulation, so one device serves the whole module.
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
from conftest import free_port, require_tool

from edgeq.demo import DIGITS_CALIB, DIGITS_MODEL, DIGITS_TEST
from edgeq.deploy.emulate import emulate, running, stop
from edgeq.errors import EdgeqError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def device():
    require_tool("aarch64-linux-gnu-gcc")
    if os.geteuid() != 0:  # as root, emulate() installs qemu-user-static itself
        require_tool("qemu-aarch64-static")
    port = free_port()
    try:
        yield emulate("rpi4", port)
    finally:
        stop(port)


@pytest.fixture(scope="module")
def rpi4_digits(tmp_path_factory):
    """The bundled digits model compiled for the Pi 4, batch 8, plus 8 real test images."""
    from edgeq.cli import main

    tmp = tmp_path_factory.mktemp("rpi4")
    assert main(["compile", str(DIGITS_MODEL), "--target", "rpi4", "-o", str(tmp / "digits"),
                 "--input-shape", "image=8x1x8x8"]) == 0
    with np.load(DIGITS_TEST) as data:
        np.savez(tmp / "images.npz", image=data["image"][:8])
    return tmp / "digits", tmp / "images.npz"


def test_deploy_bundled_model_matches_host(cli, device, rpi4_digits):
    artifact, images = rpi4_digits
    code, out, err = cli("deploy", artifact, "--rpc", f"127.0.0.1:{device.port}", "--input", images,
                         "--repeat", "3")
    assert code == 0, err
    assert f"to 127.0.0.1:{device.port} (aarch64)" in out and "match    yes" in out


def test_deploy_int8_bundled_model_matches_host(cli, device, rpi4_digits, tmp_path):
    """int8 on the Pi: int8 activations (s8 x s8 NEON kernels) there, uint8 (VNNI) on the host: same integers."""
    _, images = rpi4_digits
    assert cli("compile", DIGITS_MODEL, "--target", "rpi4", "-o", tmp_path / "int8", "--input-shape",
               "image=8x1x8x8", "--quantize", "int8", "--calib", DIGITS_CALIB)[0] == 0
    code, out, err = cli("deploy", tmp_path / "int8", "--rpc", f"127.0.0.1:{device.port}", "--input", images,
                         "--repeat", "3")
    assert code == 0, err
    assert "match    yes" in out and "max abs error" in out


def test_deploy_through_a_tracker_and_key(cli, device, rpi4_digits):
    artifact, images = rpi4_digits
    tracker_port, port = free_port(), free_port()
    try:
        assert cli("device", "tracker", "--port", tracker_port)[0] == 0
        code, out, err = cli("device", "emulate", "rpi4", "--port", port, "--tracker", f"127.0.0.1:{tracker_port}",
                             "--key", "pi4-ci")
        assert code == 0 and "registered with tracker" in out, err
        code, out, _ = cli("device", "list", "--tracker", f"127.0.0.1:{tracker_port}")
        assert code == 0 and "pi4-ci" in out
        code, out, err = cli("deploy", artifact, "--tracker", f"127.0.0.1:{tracker_port}", "--key", "pi4-ci",
                             "--input", images, "--repeat", "2")
        assert code == 0 and "match    yes" in out, err
    finally:
        stopped = stop(port) + stop(tracker_port)
    assert sorted(d.port for d in stopped) == sorted([port, tracker_port])
    assert port not in [d.port for d in running()]
    assert device in running()


def test_host_artifact_is_refused_by_the_pi(cli, device, tmp_path):
    from edgeq.cli import main

    assert main(["compile", str(DIGITS_MODEL), "-o", str(tmp_path / "x86"), "--input-shape", "image=1x1x8x8"]) == 0
    code, _, err = cli("deploy", tmp_path / "x86", "--rpc", f"127.0.0.1:{device.port}")
    assert code == 2 and "architecture mismatch" in err and "nothing uploaded" in err


def test_second_emulate_reuses_the_server(device):
    start = time.monotonic()
    assert emulate("rpi4", device.port) == device
    assert time.monotonic() - start < 5


def test_port_held_by_another_process(device):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(EdgeqError, match="already used by another process"):
            emulate("rpi4", s.getsockname()[1])


def test_tune_on_the_emulated_pi(cli, device, tmp_path):
    """Candidates are cross-linked here and measured on the board; the database then builds an rpi4 artifact."""
    import json

    import onnx
    from test_tune import conv_model

    onnx.save(conv_model(), tmp_path / "conv.onnx")
    code, out, err = cli("tune", tmp_path / "conv.onnx", "--target", "rpi4", "--rpc", f"127.0.0.1:{device.port}",
                         "--trials", 4, "--per-iteration", 4, "--work-dir", tmp_path / "work")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "work" / "rpi4" / "database_tuning_record.json").open()]
    assert len(records) == 4 and any(r[1][1][0] < 1e9 for r in records), "no candidate ran on the device"
    ledger = json.loads((tmp_path / "work" / "rpi4" / "tasks.json").read_text())
    assert all(entry["default_ms"] > 0 for entry in ledger.values())  # the default schedule, timed on the board
    assert any((entry.get("tuned_ms") or 0) > 0 for entry in ledger.values())  # ... and beside the best record
    code, _, err = cli("compile", tmp_path / "conv.onnx", "--target", "rpi4", "--tuning-db", tmp_path / "work",
                       "-o", tmp_path / "art")
    assert code == 0, err
