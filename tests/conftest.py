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


QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def ort_int8_kernels_exact() -> bool:
    """Whether onnxruntime's own int8 kernels (QLinearConv, fused QDQ) compute the ONNX arithmetic exactly here.
    On x86 without VNNI they multiply u8 x s8 pairs with vpmaddubsw, whose 16-bit sums saturate (measured on an
    AVX2 EPYC: 10-15 dB output SQNR where the QDQ arithmetic gives 32-40 dB)."""
    from targets.detect import cpu_features, host_arch

    return host_arch() != "x86_64" or bool({"avx512_vnni", "avx_vnni"} & set(cpu_features()))


def ort_outputs(model, inputs: dict) -> list[np.ndarray]:
    """The independent oracle: onnxruntime's CPU run of the same model.  A QDQ model runs unfused (DQ -> float
    op -> Q, the arithmetic ONNX specifies), never through onnxruntime's int8 kernels, which are inexact on x86
    CPUs without VNNI (ort_int8_kernels_exact); a QOperator model (QLinearConv...) runs in onnx's reference
    evaluator there (with numpy definitions of onnxruntime's com.microsoft QOperator ops)."""
    ops = {n.op_type for n in model.graph.node}
    if any(op.startswith(("QLinear", "QGemm")) or op in ("ConvInteger", "MatMulInteger") for op in ops) \
            and not ort_int8_kernels_exact():
        from onnx import version_converter
        from onnx.reference import ReferenceEvaluator

        from qkernels_reference import MICROSOFT_QOPS

        if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 21:
            model = version_converter.convert_version(model, 21)  # the evaluator implements QDQ from opset 19
        return list(ReferenceEvaluator(model, new_ops=MICROSOFT_QOPS).run(None, inputs))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if ops & QDQ_OPS:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
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


def popcount_pattern(target) -> str:
    """The popcount a bit-serial kernel compiles to on an llvm target: AVX-512 VPOPCNTDQ's vpopcnt on vectors;
    on AVX2, which has no vector popcount, LLVM's nibble-table lookup (vpshufb, then vpsadbw sums); else popcnt."""
    import tvm

    if tvm.target.codegen.target_has_features("avx512vpopcntdq", target):
        return r"^\s+vpopcnt[bwdq]\s+%[xyz]mm"
    if tvm.target.codegen.target_has_features("avx2", target):
        return r"^\s+vpshufb\s+%ymm"
    return r"^\s+v?popcnt"


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
