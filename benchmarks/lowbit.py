"""2-bit (W2A2) vs int8 vs fp32: per-layer latency of ResNet-18's 3×3 convs, Pi 4 correctness, model sizes.

The issue's goal: a 2-bit bit-serial conv at <= 0.6x the int8 conv's latency.  Each distinct 3×3 conv of
ResNet-18 (56²×64, 28²×128, 14²×256, 7²×512; stride 1, batch 1) is built as a tiny fp32 ONNX model

    input -> depthwise 1×1 conv (per-channel scale) -> ReLU -> the 3×3 conv -> ReLU -> output

and compiled three ways through edgeq's normal path: fp32, `quantize="int8"`, and `edgeq.quantize(mode="w2a2",
keep_8bit=("first",))`.  The depthwise 1×1 (grouped convs stay 8-bit) only supplies what a 3×3 conv inside a
W2A2 network reads, 2-bit PACT codes of a ReLU output; it costs one multiply per element (1/(9·C) of the 3×3
conv) and is in all three models, like the input quantize and the output dequantize.  Latency: the artifact's
benchmark() in interleaved rounds (see :func:`latencies`).  The w2a2 layers are also built for rpi4 and run on the
emulated Pi 4 (qemu + TVM RPC, `edgeq.deploy.emulate`) against the host build of the same QDQ model.  Sizes:
weight bytes from the artifacts' manifests, as the compiled modules hold them (the 2-bit layers' weights
bit-packed, 2 bits per weight).  Writes benchmarks/results/lowbit.md.

    python benchmarks/lowbit.py [--threads 1] [--layers 56 28 14 7] [--no-emulation] [--no-models]
"""

from __future__ import annotations

import argparse
import math
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from edgeq import zoo  # noqa: E402

import edgeq  # noqa: E402

LAYERS = {56: 64, 28: 128, 14: 256, 7: 512}  # ResNet-18's 3x3 stride-1 convs: spatial size -> channels


def conv_layer(size: int, channels: int, seed: int = 0) -> onnx.ModelProto:
    """The fp32 layer model (see the module docstring); He-initialised 3x3 weights, small biases."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 1.5, (channels, 1, 1, 1)).astype(np.float32)
    w = (rng.standard_normal((channels, channels, 3, 3)) * math.sqrt(2.0 / (9 * channels))).astype(np.float32)
    b = rng.normal(0.0, 0.05, channels).astype(np.float32)
    shape = [1, channels, size, size]
    nodes = [
        helper.make_node("Conv", ["input", "dw.weight"], ["dw"], name="dw", group=channels, kernel_shape=[1, 1]),
        helper.make_node("Relu", ["dw"], ["dw.relu"], name="dw.relu"),
        helper.make_node("Conv", ["dw.relu", "conv.weight", "conv.bias"], ["conv"], name="conv3x3",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["output"], name="conv.relu"),
    ]
    graph = helper.make_graph(nodes, f"conv3x3_{size}x{channels}",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
                              [numpy_helper.from_array(scale, "dw.weight"), numpy_helper.from_array(w, "conv.weight"),
                               numpy_helper.from_array(b, "conv.bias")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", zoo.OPSET)], ir_version=zoo.IR_VERSION)


def low_bit_kernels(qdq: onnx.ModelProto) -> list[str]:
    """Names of the bit-serial kernels the realize pass makes of a QDQ model (empty: none went low-bit)."""
    from tvm import relax

    from edgeq.compiler import realize_onnx

    mod = realize_onnx(qdq, "uint8")
    return [str(b.value.args[0].name_hint) for b in mod["main"].body.blocks[0].bindings
            if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == "relax.call_tir"
            and str(b.value.args[0].name_hint).startswith("bitserial")]


def ort_max_steps(qdq: onnx.ModelProto, feed: dict, ours: np.ndarray, step: float) -> float:
    """Largest |edgeq - onnxruntime| on the QDQ model, in output quantization steps."""
    import onnxruntime as ort

    oracle = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    return float(np.abs(ours - oracle).max() / step)


def output_step(quantized) -> float:
    """The real value of one code of the model output (its last QDQ's scale)."""
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.qdq.graph.initializer}
    dq = next(n for n in quantized.qdq.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "output")
    return float(inits[dq.input[1]])


def latencies(artifacts: dict, feed: dict, threads: int, repeat: int = 10, rounds: int = 3) -> dict[str, float]:
    """Median latency (ms) of each artifact, measured in interleaved rounds (each artifact.benchmark() median
    of ``repeat``), then the median over rounds: load from other processes hits every variant alike."""
    samples = {name: [] for name in artifacts}
    for _ in range(rounds):
        for name, artifact in artifacts.items():
            samples[name].append(artifact.benchmark(feed, repeat=repeat, threads=threads)["median_ms"])
    return {name: float(np.median(values)) for name, values in samples.items()}


def ceilings() -> str:
    """What this core can do at most, int8 (VNNI) against bit-serial W2A2, measured by harness.py."""
    vnni, popcount = harness.vnni_peak_gmacs(), harness.popcount_peak_gmacs()
    if vnni is None or popcount is None:
        return "(no AVX-512 VNNI / VPOPCNTDQ here: ceilings not measured)"
    return (f"Ceilings of one core (benchmarks/harness.py, instruction loops with nothing else): int8 `vpdpbusd` "
            f"{vnni:.0f} GMAC/s (64 multiply-adds per instruction); bit-serial W2A2 {popcount:.0f} GMAC/s (per 512 "
            f"channels, 4 plane pairs of AND + VPOPCNTD + ADD: 12 instructions for 512 multiply-adds). With both "
            f"kernels at their ceiling w2a2 / int8 would be {vnni / popcount:.2f}×, so the 0.6× goal is out of "
            "reach on a CPU with VNNI; bit-serial pays where the int8 path has no dot-product instruction (the "
            "Pi 4's Cortex-A72 has no `sdot`).")


def host_features() -> str:
    """Which of the dot-product / popcount features LLVM sees on this host."""
    import tvm

    import targets

    host = targets.tvm_target(targets.resolve("host"))
    names = ("avx512vnni", "avxvnni", "avx512vpopcntdq", "avx512bitalg", "popcnt")
    found = [n for n in names if tvm.target.codegen.target_has_features(n, host)]
    return ", ".join(found) or "none of " + ", ".join(names)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_device(session, artifact, x: np.ndarray, name: str) -> np.ndarray:
    """Upload an artifact's library over RPC as ``name`` (unique: the device would reuse an already loaded
    library of the same file name), run it once, return its output."""
    import tvm
    from tvm import relax

    session.upload(str(artifact.library), target=name)
    dev = session.cpu()
    vm = relax.VirtualMachine(session.load_module(name), dev)
    return vm["main"](tvm.runtime.tensor(x, dev)).numpy()


def emulated_pi(layer_models: list, work: Path, timeout: float) -> tuple[list[list], str]:
    """Build each w2a2 layer for rpi4, run it on the emulated Pi 4, compare with its host build."""
    from targets import rpc
    from edgeq.deploy.emulate import emulate, stop
    from edgeq.errors import EdgeqError

    rows = []
    port = free_port()
    try:
        start = time.perf_counter()
        emulate("rpi4", port)
        note = f"emulated Pi 4 (qemu-aarch64, cortex-a72) up in {time.perf_counter() - start:.0f} s"
        session = rpc.Device(rpc=f"127.0.0.1:{port}", timeout=timeout).connect()
        arch = rpc.remote_arch(session)
        for i, (label, quantized, host, x, step) in enumerate(layer_models):
            pi = edgeq.build(quantized, "rpi4", work / f"{label}-rpi4")
            start = time.perf_counter()
            out = rpc.with_timeout(timeout, f"running {label} on the emulated Pi", run_on_device, session, pi, x,
                                   f"lowbit_{i}.so")
            seconds = time.perf_counter() - start
            ref = host.run({"input": x})["output"]
            steps = float(np.abs(out - ref).max() / step)
            rows.append([label, arch, "yes" if steps == 0 else f"**no** ({steps:.0f} steps)",
                         f"{float(np.mean(out == ref)):.4f}", f"{seconds:.1f}"])
            print(rows[-1], flush=True)
        return rows, note
    except (EdgeqError, OSError, RuntimeError) as e:
        return rows, f"emulated Pi 4 unavailable: {str(e).splitlines()[0][:300]}"
    finally:
        stop(port)


def model_sizes(work: Path, threads: int) -> tuple[list[list], list[list]]:
    """Weight bytes (manifests) and latency of the digits model and ResNet-18 at fp32 / int8 / w2a2."""
    from edgeq.demo import DIGITS_CALIB, DIGITS_MODEL

    rng = np.random.default_rng(1)
    nets = [("digits CNN", onnx.load(DIGITS_MODEL), DIGITS_CALIB, {"image": (1, 1, 8, 8)}),
            ("ResNet-18", zoo.resnet18(batch=1, image=224, seed=0),
             {"input": rng.standard_normal((8, 3, 224, 224)).astype(np.float32)}, None)]
    size_rows, latency_rows = [], []
    for name, model, calib, shapes in nets:
        built = {}
        for mode in ("fp32", "int8", "w2a2"):
            start = time.perf_counter()
            out = work / f"{name.split()[0]}-{mode}"
            if mode == "fp32":
                built[mode] = edgeq.build(model, "host", out, input_shapes=shapes)
            else:
                quantized = edgeq.quantize(model, calib, mode=mode, input_shapes=shapes)
                built[mode] = edgeq.build(quantized, "host", out)
            print(f"{name} {mode}: built in {time.perf_counter() - start:.0f} s", flush=True)
        stored = {m: sum(a.manifest["quantization"]["weight_bytes"].values()) for m, a in built.items()}
        fp32 = stored["fp32"]
        w2a2 = built["w2a2"].manifest["quantization"]
        packed = w2a2["weights_by_precision"]["2-bit packed"]
        weighted = [layer for layer in w2a2["quantized_layers"] if layer["op"] in ("Conv", "Gemm", "MatMul")]
        low = [layer for layer in weighted if layer.get("weight_bits", 8) < 8]
        size_rows.append([name, f"{fp32:,}", f"{stored['int8']:,} ({stored['int8'] / fp32:.3f}×)",
                          f"**{stored['w2a2']:,} ({stored['w2a2'] / fp32:.3f}×)**",
                          f"{packed['bytes']:,} of {packed['fp32_bytes']:,} "
                          f"(1/{packed['fp32_bytes'] / packed['bytes']:.1f})", f"{len(low)} of {len(weighted)}"])
        feed = {built["fp32"].inputs[0].name: rng.standard_normal(built["fp32"].inputs[0].shape).astype(np.float32)}
        ms = latencies(built, feed, threads)
        latency_rows.append([name, threads, f"{ms['fp32']:.3f}", f"{ms['int8']:.3f}", f"{ms['w2a2']:.3f}",
                             f"{ms['w2a2'] / ms['int8']:.2f}×", f"{ms['int8'] / ms['fp32']:.2f}×"])
        print(size_rows[-1], latency_rows[-1], flush=True)
    return size_rows, latency_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--calib", type=int, default=8, help="calibration samples per layer")
    parser.add_argument("--no-emulation", action="store_true")
    parser.add_argument("--no-models", action="store_true")
    parser.add_argument("--device-timeout", type=float, default=300.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgeq-lowbit-"))
    rng = np.random.default_rng(0)
    rows, on_pi = [], []
    for size in args.layers:
        channels = LAYERS[size]
        label = f"{size}²×{channels}"
        model = conv_layer(size, channels)
        calib = {"input": rng.standard_normal((args.calib, channels, size, size)).astype(np.float32)}
        x = rng.standard_normal((1, channels, size, size)).astype(np.float32)
        fp32 = edgeq.build(model, "host", work / f"{size}-fp32")
        int8 = edgeq.build(model, "host", work / f"{size}-int8", quantize="int8", calibration=calib)
        w2a2_q = edgeq.quantize(model, calib, mode="w2a2", keep_8bit=("first",))
        kernels = low_bit_kernels(w2a2_q.qdq)
        w2a2 = edgeq.build(w2a2_q, "host", work / f"{size}-w2a2")
        feed = {"input": x}
        ms = latencies({"fp32": fp32, "int8": int8, "w2a2": w2a2}, feed, args.threads)
        step = output_step(w2a2_q)
        ours = w2a2.run(feed)["output"]
        gmacs = size * size * channels * channels * 9 / 1e9
        rows.append([label, f"{gmacs * 1e3:.0f}", f"{ms['fp32']:.3f}", f"{ms['int8']:.3f}", f"{ms['w2a2']:.3f}",
                     f"**{ms['w2a2'] / ms['int8']:.2f}×**", f"{ms['int8'] / ms['fp32']:.2f}×",
                     f"{gmacs / ms['w2a2'] * 1e3:.0f}", ", ".join(kernels) or "**none**",
                     f"{ort_max_steps(w2a2_q.qdq, feed, ours, step):.0f}"])
        print(rows[-1], flush=True)
        on_pi.append((label, w2a2_q, w2a2, x, step))

    if args.no_emulation:
        pi_rows, pi_note = [], "emulation skipped (--no-emulation)"
    else:
        pi_rows, pi_note = emulated_pi(on_pi, work, args.device_timeout)
    size_rows, model_rows = ([], []) if args.no_models else model_sizes(work, args.threads)

    geo = math.exp(np.mean([math.log(float(r[5].strip("*×"))) for r in rows]))
    text = [
        "# Low-bit (W2A2) kernels: per-layer latency, Pi 4 correctness, model size",
        "",
        f"Machine: {harness.machine()}",
        "",
        f"Command: `python benchmarks/lowbit.py`. {args.threads} thread(s), batch 1, default schedules (no "
        "tuning). Each ResNet-18 3×3 conv (stride 1, pad 1) is a tiny fp32 ONNX model input → depthwise 1×1 "
        "conv → ReLU → 3×3 conv → ReLU, built by edgeq as fp32, int8 (`quantize=\"int8\"`) and W2A2 "
        "(`edgeq.quantize(mode=\"w2a2\", keep_8bit=(\"first\",))`: SAWB 2-bit weights, 2-bit PACT input codes "
        "from the depthwise conv's ReLU, which stays 8-bit as grouped convs do). The depthwise conv, input "
        "quantize and output dequantize are in every column. Latency: artifact.benchmark() (median of 10, each "
        "≥ 20 ms of runs) in 3 interleaved rounds fp32/int8/w2a2, median over rounds (the machine is shared); "
        f"calibration: {args.calib} N(0,1) inputs.",
        "",
        harness.markdown_table(
            ["layer (H²×C)", "MMAC", "fp32 ms", "int8 ms", "w2a2 ms", "w2a2 / int8", "int8 / fp32",
             "w2a2 GMAC/s", "w2a2 low-bit kernel", "max diff vs ORT (output steps)"], rows),
        "",
        f"Geometric mean w2a2 / int8: **{geo:.2f}×** (goal ≤ 0.6×: {'met' if geo <= 0.6 else 'not met'}). "
        f"Host CPU features: {host_features()}. {ceilings()}",
        "",
        "## On the (emulated) Raspberry Pi 4",
        "",
        f"The w2a2 layers cross-compiled for `rpi4` (NEON `cnt` bit-serial kernels, int8 activations), run over "
        f"TVM RPC, compared with the host (x86, uint8) build of the same QDQ model. {pi_note}. Emulated timings "
        "say nothing about a real Pi.",
        "",
        harness.markdown_table(["layer", "device arch", "identical to host", "equal outputs", "run s (emulated)"],
                               pi_rows) if pi_rows else "_not run_",
        "",
    ]
    if size_rows:
        text += [
            "## Model size (weight bytes)",
            "",
            "fp32 / int8 / w2a2: the sum of `weight_bytes` in each artifact's manifest, the constants the compiled "
            "module holds (weights, int32 bias/requantize parameters, activation scales); 2-bit packed: the "
            "`weights_by_precision` entry of the w2a2 manifest, the low-bit layers' bit planes against the fp32 "
            "bytes of the same weights; first and last weighted layers stay 8-bit. Digits: the bundled model "
            "(calibration: digits_calib.npz); ResNet-18: edgeq/zoo.py, 8 N(0,1) calibration images.",
            "",
            harness.markdown_table(["model", "fp32", "int8", "w2a2", "2-bit packed (of their fp32)",
                                    "2-bit conv/dense layers"], size_rows),
            "",
            "Whole-model latency of the same builds (ms):",
            "",
            harness.markdown_table(["model (batch 1)", "threads", "fp32", "int8", "w2a2", "w2a2 / int8",
                                    "int8 / fp32"], model_rows),
        ]
    harness.write_result("lowbit", "\n".join(text))


if __name__ == "__main__":
    main()
