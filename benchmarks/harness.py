"""Shared benchmark plumbing: timing onnxruntime, describing the machine, writing result tables."""

from __future__ import annotations

import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def ort_latency_ms(model, inputs: dict, threads: int, repeat: int = 20, min_repeat_ms: float = 20) -> float:
    """Median latency of onnxruntime (all graph optimizations on) with `threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, inputs)
    samples = []
    for _ in range(repeat):
        runs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) * 1e3 < min_repeat_ms or runs == 0:
            session.run(None, inputs)
            runs += 1
        samples.append(elapsed / runs * 1e3)
    return float(np.median(samples))


def machine() -> str:
    """One line naming the machine the numbers were taken on."""
    import tvm
    from tvm.target import codegen

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import onnxruntime

    return (f"{cpu} (LLVM mcpu {codegen.llvm_get_system_cpu()}), {os.cpu_count()} cores, {platform.system()}; "
            f"TVM {tvm.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, text: str) -> Path:
    """Print a result and commit-ready write it to benchmarks/results/<name>.md (atomically)."""
    print(text)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
