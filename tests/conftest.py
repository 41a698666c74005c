"""Shared fixtures: the onnxruntime oracle, the CLI driver, required cross toolchains, and TVM RPC processes on
loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest

from edgeq.cli import main


def ort_outputs(model, inputs: dict) -> list[np.ndarray]:
    """The independent oracle: onnxruntime's CPU run of the same model."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


@pytest.fixture
def cli(capsys):
    """Run `edgeq ARGS...` in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def require_tool(name: str) -> str:
    """A toolchain binary the test needs: CI must have it (the Makefile installs it), elsewhere skip."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing on CI; `make toolchains` should have installed it")
        pytest.skip(f"{name} not installed (make toolchains installs it)")
    return path


def llvm_assembly(executable) -> str:
    """The CPU assembly of a compiled module and everything it imports."""
    from edgeq.build import _modules

    return "\n".join(m.inspect_source("asm") for m in _modules(executable.mod) if m.kind == "llvm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "server exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(port)


def start(*args: str, port: int | None = None):
    """A TVM RPC process in its own process group (the server forks a worker per session)."""
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    if port is not None:
        wait_listening(port, proc)
    return proc


def kill(proc) -> None:
    """The process and everything it forked (nothing if they are gone already)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
