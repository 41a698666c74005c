"""fp32 latency without tuning: edgeq vs onnxruntime (and plain TVM) on ResNet-18 and MobileNetV2 shapes.

Models are built here with random weights (edgeq/zoo.py). Each row is measured in one run, and
ratios are edgeq / onnxruntime at the same thread count. Writes benchmarks/results/latency.md.

    python benchmarks/latency.py [--threads 1 2] [--no-plain-tvm]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from edgeq import zoo  # noqa: E402

import edgeq  # noqa: E402
import targets  # noqa: E402
from edgeq.artifact import thread_count  # noqa: E402


def plain_tvm_latency_ms(model, inputs: dict, threads: int) -> float:
    """TVM 0.27 as a user gets it: from_onnx + tvm.compile with the default pipeline, no tuning."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(model, shape_dict={name: list(a.shape) for name, a in inputs.items()})
    ex = tvm.compile(mod, targets.tvm_target(targets.resolve("host")))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    vm.set_input("main", *[tvm.runtime.tensor(a) for a in inputs.values()])
    with thread_count(threads):
        vm.invoke_stateful("main")
        timer = vm.time_evaluator("invoke_stateful", tvm.cpu(), number=1, repeat=3)
        return float(np.median(timer("main").results) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-plain-tvm", action="store_true", help="skip the (slow) plain TVM baseline")
    args = parser.parse_args()

    rows = []
    for name, build_model in [("ResNet-18", zoo.resnet18), ("MobileNetV2", zoo.mobilenet_v2)]:
        model = build_model(batch=1, image=224, seed=0)
        inputs = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
        start = time.perf_counter()
        artifact = edgeq.build(model, "host", Path(tempfile.mkdtemp()) / name)
        compile_s = time.perf_counter() - start
        for threads in args.threads:
            ours = artifact.benchmark(inputs, repeat=10, threads=threads)["median_ms"]
            ort_ms = harness.ort_latency_ms(model, inputs, threads)
            plain = None if args.no_plain_tvm else plain_tvm_latency_ms(model, inputs, threads)
            rows.append([name, threads, f"{ours:.2f}", f"{ort_ms:.2f}", f"**{ours / ort_ms:.2f}×**",
                         "-" if plain is None else f"{plain:.1f}", "-" if plain is None else f"{plain / ours:.1f}×",
                         f"{compile_s:.1f}", len(artifact.manifest["tuning"]["tuned_kernels"])])
            print(rows[-1], flush=True)
    table = harness.markdown_table(
        ["model (batch 1, 224²)", "threads", "edgeq ms", "onnxruntime ms", "edgeq / ORT", "plain TVM ms",
         "plain TVM / edgeq", "edgeq compile s", "kernels with a shipped record"], rows)
    harness.write_result("latency", "\n".join([
        "# fp32 latency without tuning: edgeq vs onnxruntime",
        "",
        f"Machine: {harness.machine()}",
        "",
        "Command: `python benchmarks/latency.py`. Median of 10 measurements (each ≥ 20 ms of runs). "
        "edgeq = a build without a tuning run: edgeq's default schedules, and its shipped tuning records "
        "(schedules/databases/) for the kernels where one beat the default on this CPU (counted in the last "
        "column); plain TVM = `tvm.compile` with its default pipeline. Ratios > 1 mean edgeq is slower.",
        "",
        table,
    ]))


if __name__ == "__main__":
    main()
