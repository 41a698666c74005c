"""Shared fixtures: the onnxruntime oracle, the CLI driver, and required cross toolchains."""

from __future__ import annotations

import os
import shutil

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
