"""Deploy over TVM RPC against a real RPC server and tracker on loopback (this machine as the device)."""

import socket
import time

import numpy as np
import pytest
import zoo
from conftest import free_port, kill, require_tool, start

import edgeq
from edgeq import EdgeqError
from edgeq.deploy import rpc
from edgeq.deploy.rpc import deploy
from targets import rpc as targets_rpc
from targets.rpc import Device


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = start("tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1),
                 port=port)
    yield proc, f"127.0.0.1:{port}"
    kill(proc)


@pytest.fixture(scope="module")
def host_artifact(tmp_path_factory):
    return edgeq.build(zoo.ZOO["mixed"](), "host", tmp_path_factory.mktemp("d") / "mixed")


def test_deploy_runs_compares_and_times(server, host_artifact):
    inputs = zoo.random_inputs(zoo.ZOO["mixed"](), seed=3)
    report = deploy(host_artifact.path, Device(rpc=server[1]), inputs, repeat=3)
    assert report.match and report.arch == "x86_64"
    np.testing.assert_allclose(report.outputs["out"], host_artifact.run(inputs)["out"], rtol=1e-5, atol=1e-6)
    assert report.latency_ms["repeat"] == 3 and report.latency_ms["min_ms"] > 0


def test_cli_deploy(cli, server, host_artifact):
    code, out, err = cli("deploy", host_artifact.path, "--rpc", server[1], "--repeat", "2")
    assert code == 0, err
    assert "match    yes" in out and "latency" in out


def test_wrong_port_is_refused_quickly(host_artifact):
    start_time = time.time()
    with pytest.raises(EdgeqError, match="cannot connect to 127.0.0.1:.*connection refused"):
        deploy(host_artifact.path, Device(rpc=f"127.0.0.1:{free_port()}", timeout=10))
    assert time.time() - start_time < 10


def test_silent_server_times_out(host_artifact):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(EdgeqError, match="timed out after 2 s"):
            deploy(host_artifact.path, Device(rpc=f"127.0.0.1:{port}", timeout=2))


def test_architecture_mismatch_uploads_nothing(server, tmp_path):
    require_tool("aarch64-linux-gnu-gcc")  # without it the rpi4 build holds objects, refused for that reason
    artifact = edgeq.build(zoo.ZOO["conv"](), "rpi4", tmp_path / "rpi4")
    with pytest.raises(EdgeqError, match="architecture mismatch: .* built for aarch64 .* is x86_64; nothing uploaded"):
        deploy(artifact.path, Device(rpc=server[1]))


def test_corrupt_artifact_is_refused_before_connecting(host_artifact, tmp_path):
    import shutil

    broken = shutil.copytree(host_artifact.path, tmp_path / "broken")
    (broken / "model.so").write_bytes(b"tampered")
    with pytest.raises(EdgeqError, match="checksum mismatch"):
        deploy(broken, Device(rpc="127.0.0.1:1"))


def test_server_killed_mid_deploy(host_artifact, monkeypatch):
    port = free_port()
    proc = start("tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1),
                 port=port)
    original = rpc._run_remote

    def killed_first(*args):
        kill(proc)
        return original(*args)

    monkeypatch.setattr(rpc, "_run_remote", killed_first)
    with pytest.raises(EdgeqError, match="cannot connect|dropped"):
        deploy(host_artifact.path, Device(rpc=f"127.0.0.1:{port}", timeout=30))


def test_tracker_and_key(host_artifact, cli):
    tracker_port, server_port = free_port(), free_port()
    tracker = start("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tracker_port),
                    "--port-end", str(tracker_port + 1), port=tracker_port)
    server = start("tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(server_port), "--port-end",
                   str(server_port + 1), "--tracker", f"127.0.0.1:{tracker_port}", "--key", "pi-test")
    try:
        tracker_addr = f"127.0.0.1:{tracker_port}"
        deadline = time.time() + 60
        while "pi-test" not in targets_rpc.tracker_keys(tracker_addr) and time.time() < deadline:
            time.sleep(0.5)
        report = deploy(host_artifact.path, Device(tracker=tracker_addr, key="pi-test"), repeat=2)
        assert report.match
        code, out, _ = cli("device", "list", "--tracker", tracker_addr)
        assert code == 0 and "pi-test" in out
        with pytest.raises(EdgeqError, match="no device registered under key 'rpi9' \\(keys: pi-test\\)"):
            deploy(host_artifact.path, Device(tracker=tracker_addr, key="rpi9"))
    finally:
        kill(server)
        kill(tracker)


def test_device_choice_is_required():
    with pytest.raises(EdgeqError, match="either --rpc"):
        Device()
    with pytest.raises(EdgeqError, match="--tracker needs --key"):
        Device(tracker="127.0.0.1:9190")
    with pytest.raises(EdgeqError, match="bad address"):
        targets_rpc.parse_address("localhost")
