"""The architectures users bring: edgeq vs ONNX Runtime vs OpenVINO, fp32 and int8, batch 1.

Models come from their own tools (tests/ecosystem.py: torchvision architectures through torch.onnx.export,
YOLOv8n through Ultralytics' exporter, a BERT-style encoder from torch.nn), random weights. int8: edgeq quantizes
with its own calibration (minmax, per-channel weights); ONNX Runtime and OpenVINO run the QDQ model
`onnxruntime.quantization.quantize_static` writes from the same calibration samples (the path their users take;
OpenVINO compiles a QDQ model to its int8 kernels). SQNR: each engine's int8 output against onnxruntime's fp32
output on the same input. OpenVINO fp32 runs with INFERENCE_PRECISION_HINT=f32 (its default on AMX/AVX512-FP16
CPUs is bf16/f16).

Every latency is measured in a process of its own (one engine, one model, one thread count), the engines
interleaved round by round; the table gives the median over rounds. Builds happen first, never while timing.
Writes benchmarks/results/zoo-<cpu>.md.

    python benchmarks/zoo.py [--models a,b] [--threads 1 2] [--rounds 2] [--no-int8] [--prepare-only] [--reuse]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import harness  # noqa: E402

CACHE = Path(__file__).parent / ".zoo-cache"  # exports and artifacts, reused between runs (git-ignored)
MODELS = {  # name -> (source, argument): what the table measures
    "EfficientNet-B0": ("torchvision", "efficientnet_b0"),
    "RegNetY-400MF": ("torchvision", "regnet_y_400mf"),
    "RegNetX-400MF": ("torchvision", "regnet_x_400mf"),
    "ResNeXt-50 32x4d": ("torchvision", "resnext50_32x4d"),
    "ViT-B/16": ("torchvision", "vit_b_16"),
    "DeepLabV3-MobileNetV3 (320²)": ("torchvision", "deeplabv3_mobilenet_v3_large"),
    "YOLOv8n (Ultralytics, 320²)": ("ultralytics", "yolov8n.yaml"),
    "ConvNeXt-T": ("torchvision", "convnext_tiny"),
    "MobileNetV3-L": ("torchvision", "mobilenet_v3_large"),
    "MobileNetV3-S": ("torchvision", "mobilenet_v3_small"),
    "ShuffleNetV2 x0.5": ("torchvision", "shufflenet_v2_x0_5"),
    "ResNet-50": ("torchvision", "resnet50"),
    "GoogLeNet": ("torchvision", "googlenet"),
    "Swin-T": ("torchvision", "swin_t"),
    "BERT-style encoder (4 layers, width 256, 128 tokens)": ("encoder", None),
}
ENGINES = ("edgeq", "ort", "openvino")


def export(name: str) -> tuple[Path, dict]:
    import ecosystem

    source, arg = MODELS[name]
    CACHE.mkdir(exist_ok=True)
    if source == "torchvision":
        path, x = ecosystem.torchvision_model(arg, CACHE)
    elif source == "ultralytics":
        path, x = ecosystem.ultralytics_model(arg, CACHE, 320)
    else:
        path, x = ecosystem.transformer_encoder(CACHE)
    import onnx

    return path, {onnx.load(path).graph.input[0].name: x}


def _calibration(feeds: dict, uniform: bool) -> dict:
    rng = np.random.default_rng(1)
    return {k: (rng.uniform(0, 1, (8, *v.shape[1:])) if uniform else rng.standard_normal((8, *v.shape[1:])))
            .astype(np.float32) for k, v in feeds.items()}


def prepare(name: str, int8: bool) -> dict:
    """Export, build (fp32, int8) and write ORT's QDQ model; returns the paths and the int8 SQNRs."""
    import edgeq

    path, feeds = export(name)
    stem = path.stem
    out = {"model": str(path), "feeds": str(CACHE / f"{stem}.inputs.npz")}
    np.savez(out["feeds"], **feeds)
    start = time.perf_counter()
    fp32 = CACHE / f"{stem}.edgeq-fp32"
    edgeq.build(path, "host", fp32)
    out.update(edgeq_fp32=str(fp32), compile_s=round(time.perf_counter() - start, 1))
    if not int8:
        return out
    try:  # one model's int8 failure is a result to report, not the end of the run
        out.update(_prepare_int8(name, path, feeds, out["feeds"]))
    except Exception as err:  # noqa: BLE001
        out["int8_error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160]}"
    return out


def _prepare_int8(name: str, path: Path, feeds: dict, feeds_path: str) -> dict:
    import onnx

    import edgeq
    from conftest import ort_outputs

    stem, out = path.stem, {}
    calibration = _calibration(feeds, uniform=MODELS[name][0] == "ultralytics")
    start = time.perf_counter()
    quantized = edgeq.quantize(path, calibration)
    art8 = edgeq.build(quantized, "host", CACHE / f"{stem}.edgeq-int8")
    out.update(edgeq_int8=str(art8.path), int8_compile_s=round(time.perf_counter() - start, 1),
               quantized=len(art8.manifest["quantization"]["quantized_layers"]),
               float_layers=len(art8.manifest["quantization"]["float_layers"]))
    qdq = CACHE / f"{stem}.ort-qdq.onnx"
    _ort_quantize(path, calibration, qdq)
    out["ort_qdq"] = str(qdq)
    reference = ort_outputs(onnx.load(path), feeds)[0]
    out["sqnr"] = {"edgeq": _sqnr(reference, next(iter(art8.run(feeds).values()))),
                   "ort": _sqnr(reference, ort_outputs(onnx.load(qdq), feeds)[0]),
                   "openvino": _openvino_sqnr(reference, qdq, feeds_path)}
    return out


def _ort_quantize(path: Path, calibration: dict, qdq: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            n = len(next(iter(calibration.values())))
            self.samples = iter([{k: v[i:i + 1] for k, v in calibration.items()} for i in range(n)])

        def get_next(self):
            return next(self.samples, None)

    pre = (qdq.with_name(qdq.stem + ".pre.onnx")).resolve()
    path, qdq = path.resolve(), qdq.resolve()
    with contextlib.chdir(CACHE):  # ORT writes its scratch files (sym_shape_infer_temp.onnx, *.data) to the cwd
        try:  # what ORT's docs tell users to run first; its symbolic shape inference fails on some graphs
            quant_pre_process(str(path), str(pre))
        except Exception:  # noqa: BLE001 (ORT raises AssertionError and others)
            quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(qdq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _sqnr(signal: np.ndarray, noisy: np.ndarray) -> float:
    return round(harness.sqnr_db(signal, noisy), 1)


def _openvino_sqnr(reference: np.ndarray, qdq: Path, feeds_path: str) -> float | None:
    """In a process of its own: OpenVINO 2026.4 crashes (SIGSEGV) compiling some QDQ models (Swin-T's)."""
    result = qdq.with_name(qdq.stem + ".openvino-output.npy")
    done = subprocess.run([sys.executable, __file__, "--openvino-output", str(qdq), feeds_path, str(result)],
                          capture_output=True, text=True)
    return _sqnr(reference, np.load(result)) if done.returncode == 0 else None


def _openvino_compiled(model: str, threads: int):
    import openvino as ov

    return ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                  "INFERENCE_PRECISION_HINT": "f32",
                                                  "PERFORMANCE_HINT": "LATENCY"})


# --- one measurement, in its own process ------------------------------------------------------------------

def measure(engine: str, model: str, feeds_path: str, threads: int) -> float:
    feeds = dict(np.load(feeds_path))
    if engine == "edgeq":
        import edgeq

        return edgeq.Artifact.load(model).benchmark(feeds, repeat=15, threads=threads)["median_ms"]
    if engine == "ort":
        import onnx

        return harness.ort_latency_ms(onnx.load(model), feeds, threads, repeat=15)
    request = _openvino_compiled(model, threads).create_infer_request()
    return harness.median_ms(lambda: request.infer(feeds), repeat=15)


def _measure_in_process(engine: str, model: str, feeds: str, threads: int) -> float | None:
    """Milliseconds, or None where the engine's process failed (a crash is a result too)."""
    done = subprocess.run([sys.executable, __file__, "--measure", engine, model, feeds, str(threads)],
                          capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None


def _geomean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.exp(np.mean(np.log(values)))) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated parts of names, e.g. 'resnet,bert' (default: all)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="time the builds of the last run again")
    parser.add_argument("--prepare-only", action="store_true", help="build, measure SQNR, time nothing")
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--openvino-output", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.openvino_output:
        model, feeds, result = args.openvino_output
        compiled = _openvino_compiled(model, 2)
        np.save(result, compiled(dict(np.load(feeds)))[compiled.output(0)])
        return
    if args.measure:
        engine, model, feeds, threads = args.measure
        print(measure(engine, model, feeds, int(threads)))
        return
    names = [n for n in MODELS if any(k.strip().lower() in n.lower() for k in args.models.split(","))] \
        if args.models else list(MODELS)
    record = CACHE / "prepared.json"  # what the last preparation built: --reuse times it again without rebuilding
    earlier = json.loads(record.read_text()) if args.reuse and record.exists() else {}
    prepared = {}
    for name in names:
        prepared[name] = earlier[name] if name in earlier else prepare(name, not args.no_int8)
        print(name, json.dumps(prepared[name].get("sqnr") or prepared[name].get("int8_error")), flush=True)
        record.write_text(json.dumps({**earlier, **prepared}, indent=1))
    if args.prepare_only:
        return
    jobs = []  # (name, threads, column, engine, model file)
    for name, p in prepared.items():
        for threads in args.threads:
            jobs += [(name, threads, "edgeq fp32", "edgeq", p["edgeq_fp32"]), (name, threads, "ORT fp32", "ort", p["model"]),
                     (name, threads, "OpenVINO fp32", "openvino", p["model"])]
            if "edgeq_int8" in p:
                jobs += [(name, threads, "edgeq int8", "edgeq", p["edgeq_int8"]),
                         (name, threads, "ORT int8", "ort", p["ort_qdq"]),
                         (name, threads, "OpenVINO int8", "openvino", p["ort_qdq"])]
    times: dict = {}
    for r in range(args.rounds):  # rounds interleave the engines: a disturbance hits all of them alike
        for name, threads, column, engine, model in jobs:
            ms = _measure_in_process(engine, model, prepared[name]["feeds"], threads)
            if ms is not None:
                times.setdefault((name, threads, column), []).append(ms)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    _report(prepared, {k: float(np.median(v)) for k, v in times.items()}, args)


def _ms(value: float | None) -> str:
    return "crashes" if value is None else f"{value:.2f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None else None


def _bold(value: float | None) -> str:
    return "–" if value is None else f"**{value:.2f}**"


def _report(prepared: dict, ms: dict, args) -> None:
    int8 = not args.no_int8
    rows, ratios = [], {}  # ratios: (kind, threads) -> per-model values
    for name, p in prepared.items():
        for threads in args.threads:
            get = lambda column: ms.get((name, threads, column))  # noqa: E731
            fp32, ort, ov = get("edgeq fp32"), get("ORT fp32"), get("OpenVINO fp32")
            row = [name, threads, _ms(fp32), _ms(ort), _ms(ov), _bold(_ratio(fp32, ort))]
            ratios.setdefault(("fp32", threads), []).append(_ratio(fp32, ort))
            if int8 and "int8_error" in p:
                row += ["–"] * 6 + [f"edgeq int8 fails: {p['int8_error']}", "–"]
            elif int8:
                e8, o8, v8 = get("edgeq int8"), get("ORT int8"), get("OpenVINO int8")
                s = p["sqnr"]
                sqnr = " / ".join("crashes" if s[e] is None else str(s[e]) for e in ENGINES)
                row += [_ms(e8), _ms(o8), _ms(v8), _bold(_ratio(e8, v8)), _bold(_ratio(e8, fp32)).strip("*"),
                        sqnr, f"{p['quantized']} / {p['float_layers']}"]
                ratios.setdefault(("int8_vs_ov", threads), []).append(_ratio(e8, v8))
                ratios.setdefault(("int8_vs_fp32", threads), []).append(_ratio(e8, fp32))
            rows.append(row + [p["compile_s"]])
    header = ["model (batch 1)", "threads", "edgeq fp32 ms", "ORT fp32 ms", "OpenVINO fp32 ms", "edgeq / ORT fp32"]
    if int8:
        header += ["edgeq int8 ms", "ORT int8 ms", "OpenVINO int8 ms", "edgeq / OpenVINO int8",
                   "edgeq int8 / fp32", "int8 SQNR dB edgeq / ORT / OpenVINO", "edgeq layers int8 / float"]
    header += ["edgeq compile s"]
    summary = []
    for threads in args.threads:
        fp32 = [r for r in ratios[("fp32", threads)] if r is not None]
        line = f"{threads} thread{'s' if threads > 1 else ''}: fp32 edgeq / ORT geomean " \
               f"**{_geomean(fp32):.2f}** (max {max(fp32):.2f})"
        if int8:
            line += f"; int8 edgeq / OpenVINO geomean **{_geomean(ratios[('int8_vs_ov', threads)]):.2f}**; " \
                    f"edgeq int8 / edgeq fp32 geomean **{_geomean(ratios[('int8_vs_fp32', threads)]):.2f}**"
        summary += [f"- {line}"]
    import openvino

    cpu = harness.machine()
    harness.write_result(f"zoo-{_cpu_tag()}", "\n".join([
        "# The architectures users bring: edgeq vs ONNX Runtime vs OpenVINO",
        "",
        f"Machine: {cpu}; OpenVINO {openvino.__version__}",
        "",
        f"Command: `python benchmarks/zoo.py --threads {' '.join(map(str, args.threads))} --rounds {args.rounds}`. "
        "Each latency: a process of its own, median of 15 measurements (each >= 20 ms of runs), median over "
        "the rounds, engines interleaved. edgeq without a tuning run (default schedules). Ratios < 1: edgeq faster. "
        "Geomeans over the models where both engines ran.",
        "",
        *summary,
        "",
        harness.markdown_table(header, rows),
    ]))


def _cpu_tag() -> str:
    from tvm.target import codegen

    return codegen.llvm_get_system_cpu()


if __name__ == "__main__":
    main()
