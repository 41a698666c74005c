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
    return median_ms(lambda: session.run(None, inputs), repeat, min_repeat_ms)


def median_ms(run, repeat: int = 20, min_repeat_ms: float = 20) -> float:
    """Median over `repeat` measurements of one call's milliseconds, each measurement at least `min_repeat_ms`
    of calls, after one warm-up call."""
    run()
    samples = []
    for _ in range(repeat):
        runs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) * 1e3 < min_repeat_ms or runs == 0:
            run()
            runs += 1
        samples.append(elapsed / runs * 1e3)
    return float(np.median(samples))


def sqnr_db(reference: np.ndarray, value: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - value)^2), in float64; a noise floor of 1e-30 keeps exact results finite."""
    reference = reference.astype(np.float64)
    return float(10 * np.log10(np.sum(reference ** 2) / max(np.sum((reference - value) ** 2), 1e-30)))


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


def model_macs(model) -> int:
    """Multiply-accumulates of the Conv / Gemm / MatMul nodes of an ONNX model (batch as given), from inferred
    shapes: what an int8 model spends its dot-product instructions on."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    shapes.update({t.name: list(t.dims) for t in inferred.graph.initializer})
    macs = 0
    for node in inferred.graph.node:
        out = shapes.get(node.output[0])
        if node.op_type == "Conv" and out:
            weight = shapes[node.input[1]]  # O, I/group, KH, KW
            macs += int(np.prod(out)) * int(np.prod(weight[1:]))
        elif node.op_type in ("Gemm", "MatMul") and out:
            a = shapes[node.input[0]]
            macs += int(np.prod(out)) * int(a[-1] if not (node.op_type == "Gemm" and _attr(node, "transA")) else a[0])
    return macs


def _attr(node, name, default=0):
    return next((a.i for a in node.attribute if a.name == name), default)


CHAINS = 12  # independent accumulators in the instruction loops below: enough to hide every latency


def vnni_peak_gmacs() -> float | None:
    """The int8 multiply-accumulates per second one core issues in a loop of independent AVX-512 VNNI
    ``vpdpbusd`` (12 chains of 64 u8 x s8 products each): the ceiling of any int8 conv on this CPU.
    None where the host has no AVX-512 VNNI."""
    from tvm.script import tirx as T

    @T.macro
    def step(acc, a, b, k):
        acc[k, T.ramp(0, 1, 16)] = T.call_llvm_pure_intrin(
            "int32x16", "llvm.x86.avx512.vpdpbusd.512", acc[k, T.ramp(0, 1, 16)], a[k, T.ramp(0, 1, 64)],
            b[T.ramp(0, 1, 64)])

    operands = [np.ones((CHAINS, 64), np.uint8), np.ones(64, np.int8)]
    return _loop_gmacs("avx512vnni", step, operands, macs_per_step=CHAINS * 64)


def popcount_peak_gmacs(activation_bits: int = 2, weight_bits: int = 2) -> float | None:
    """The a-bit x w-bit multiply-accumulates per second one core can do bit-serially: a loop of independent
    (AND, VPOPCNTD, ADD) steps on 512-bit vectors, each counting 512 bit products of one plane pair; a x w plane
    pairs make 512 multiply-adds. The ceiling of any AND + popcount kernel on this CPU (before packing the
    activation planes). The AND's operand is XORed with the accumulator so LLVM cannot hoist it out of the loop
    (the two fuse into one VPTERNLOGD, plus a register copy it needs: a slight underestimate). None where the
    host has no AVX-512 VPOPCNTDQ."""
    from tvm.script import tirx as T

    @T.macro
    def step(acc, a, w, k):
        acc[k, T.ramp(0, 1, 16)] = acc[k, T.ramp(0, 1, 16)] + T.Cast("int32x16", T.popcount(
            (a[k, T.ramp(0, 1, 16)] ^ T.reinterpret("uint32x16", acc[k, T.ramp(0, 1, 16)])) & w[T.ramp(0, 1, 16)]))

    operands = [np.full((CHAINS, 16), 0x5A5A5A5A, np.uint32), np.full(16, 0x5A5A5A5A, np.uint32)]
    return _loop_gmacs("avx512vpopcntdq", step, operands,
                       macs_per_step=CHAINS * 512 / (activation_bits * weight_bits))


def _loop_gmacs(feature: str, step, operands: list, macs_per_step: float, steps: int = 2_000_000) -> float | None:
    """GMAC/s of `steps` rounds of the T.macro `step(acc, a, b, k)` on CHAINS int32x16 accumulators (operands a, b),
    built for this host, best of 5 runs; None where the host lacks the LLVM `feature` it needs."""
    import tvm
    from tvm.script import tirx as T
    from tvm.target import codegen

    import targets

    target = targets.tvm_target(targets.resolve("host"))
    if not codegen.target_has_features(feature, target):
        return None
    (a_shape, a_dtype), (b_shape, b_dtype) = ((x.shape, str(x.dtype)) for x in operands)

    @T.prim_func(s_tir=True)
    def loop(a: T.Buffer(a_shape, a_dtype), b: T.Buffer(b_shape, b_dtype), c: T.Buffer((CHAINS, 16), "int32"),
             rounds: T.int32):
        acc = T.sblock_alloc_buffer((CHAINS, 16), "int32")
        for k in T.unroll(CHAINS):
            acc[k, T.ramp(0, 1, 16)] = T.Broadcast(T.int32(0), 16)
        for _ in range(rounds):
            for k in T.unroll(CHAINS):
                step(acc, a, b, k)
        for k in T.unroll(CHAINS):
            c[k, T.ramp(0, 1, 16)] = acc[k, T.ramp(0, 1, 16)]

    lib = tvm.compile(tvm.IRModule({"main": loop.with_attr("global_symbol", "main")}), target)
    args = [tvm.runtime.tensor(x) for x in (*operands, np.zeros((CHAINS, 16), np.int32))]
    seconds = min(lib.mod.time_evaluator("main", tvm.cpu(), number=1, repeat=5)(*args, steps).results)
    return steps * macs_per_step / seconds / 1e9
