"""int8 latency and accuracy: edgeq vs onnxruntime `quantize_static` on ResNet-18 and MobileNetV2 shapes.

Both quantizers get the same fp32 model and the same calibration inputs, both use MinMax calibration, uint8
per-tensor activations and int8 per-channel weights (ONNX Runtime: QDQ format after its recommended
`quant_pre_process`).  Printed in one run, at each thread count: edgeq-int8 / ORT-int8 latency,
edgeq-int8 / edgeq-fp32 latency, and the output SQNR of each int8 model against the fp32 model on held-out
inputs.  No tuning (edgeq's default schedules).  Writes benchmarks/results/int8.md.

    python benchmarks/int8.py [--threads 1 2] [--calib 16] [--models resnet18 mobilenet_v2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from edgeq import zoo  # noqa: E402

import edgeq  # noqa: E402

MODELS = zoo.MODELS


def ort_quantize(model: onnx.ModelProto, calibration: np.ndarray, work: Path) -> onnx.ModelProto:
    """ONNX Runtime's recommended static int8 recipe: pre-process, then QDQ with per-channel weights."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.batches, None)

    fp32, prep, out = work / "fp32.onnx", work / "prep.onnx", work / "ort_int8.onnx"
    onnx.save(model, fp32)
    quant_pre_process(str(fp32), str(prep))
    quantize_static(str(prep), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return onnx.load(out)


def ort_run(model: onnx.ModelProto, inputs: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x[None]})[0] for x in inputs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--calib", type=int, default=16, help="calibration samples")
    parser.add_argument("--eval", type=int, default=8, help="held-out samples for SQNR")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    rows, notes = [], []
    peak = harness.vnni_peak_gmacs()
    for key in args.models:
        name, build_model = MODELS[key]
        model = build_model(batch=1, image=224, seed=0)
        calibration = rng.standard_normal((args.calib, 3, 224, 224)).astype(np.float32)
        held_out = rng.standard_normal((args.eval, 3, 224, 224)).astype(np.float32)
        work = Path(tempfile.mkdtemp())
        start = time.perf_counter()
        ours_int8 = edgeq.build(model, "host", work / "int8", quantize="int8", calibration={"input": calibration})
        int8_s = time.perf_counter() - start
        ours_fp32 = edgeq.build(model, "host", work / "fp32")
        start = time.perf_counter()
        theirs_int8 = ort_quantize(model, calibration, work)
        ort_s = time.perf_counter() - start
        reference = ort_run(model, held_out)
        ours_out = np.concatenate([ours_int8.run({"input": x[None]})["output"] for x in held_out])
        ours_sqnr = harness.sqnr_db(reference, ours_out)
        theirs_sqnr = harness.sqnr_db(reference, ort_run(theirs_int8, held_out))
        agree = float(np.mean(ours_out.argmax(1) == reference.argmax(1)))
        weights = ours_int8.manifest["quantization"]["weight_bytes"]
        shipped = {k: len(a.manifest["tuning"]["tuned_kernels"]) for k, a in (("int8", ours_int8), ("fp32", ours_fp32))}
        notes.append(f"{name}: edgeq quantize+compile {int8_s:.0f} s (ORT quantize_static {ort_s:.0f} s); "
                     f"kernels with a shipped tuning record: int8 {shipped['int8']}, fp32 {shipped['fp32']}; "
                     f"weights {sum(weights.values()) / 1e6:.1f} MB int8 form "
                     f"({', '.join(f'{k} {v / 1e6:.2f} MB' for k, v in sorted(weights.items()))}); "
                     f"edgeq int8 top-1 agreement with fp32 on {args.eval} held-out inputs {agree:.0%}")
        feed = {"input": held_out[:1]}
        for threads in args.threads:
            int8_ms = ours_int8.benchmark(feed, repeat=10, threads=threads)["median_ms"]
            fp32_ms = ours_fp32.benchmark(feed, repeat=10, threads=threads)["median_ms"]
            ort_int8_ms = harness.ort_latency_ms(theirs_int8, feed, threads)
            ort_fp32_ms = harness.ort_latency_ms(model, feed, threads)
            if threads == 1 and peak:
                gmacs = harness.model_macs(model) / 1e9
                notes.append(f"{name}, 1 thread: {gmacs:.2f} GMAC of conv/dense; edgeq int8 {gmacs / int8_ms * 1e3:.0f} "
                             f"GMAC/s = {gmacs / int8_ms * 1e3 / peak:.0%} of this core's VNNI peak, ORT int8 "
                             f"{gmacs / ort_int8_ms * 1e3:.0f} GMAC/s = {gmacs / ort_int8_ms * 1e3 / peak:.0%}")
            rows.append([name, threads, f"{int8_ms:.2f}", f"{ort_int8_ms:.2f}", f"**{int8_ms / ort_int8_ms:.2f}×**",
                         f"{fp32_ms:.2f}", f"{int8_ms / fp32_ms:.2f}×", f"{ort_fp32_ms:.2f}",
                         f"{ours_sqnr:.1f}", f"{theirs_sqnr:.1f}"])
            print(rows[-1], flush=True)
    table = harness.markdown_table(
        ["model (batch 1, 224²)", "threads", "edgeq int8 ms", "ORT int8 ms", "edgeq int8 / ORT int8",
         "edgeq fp32 ms", "edgeq int8 / fp32", "ORT fp32 ms", "edgeq SQNR dB", "ORT SQNR dB"], rows)
    harness.write_result("int8", "\n".join([
        "# int8: edgeq vs onnxruntime quantize_static",
        "",
        f"Machine: {harness.machine()}",
        "",
        "Command: `python benchmarks/int8.py`. Same fp32 model (random He-initialised weights, BN statistics "
        f"set as in a trained net), same {args.calib} calibration inputs (N(0,1) images), MinMax calibration, "
        "uint8 activations / int8 per-channel weights for both; ORT = QDQ after `quant_pre_process`. Latency: "
        "median of 10 measurements (edgeq) / 20 (ORT), each ≥ 20 ms of runs, batch 1. SQNR: output against the "
        f"fp32 model on {args.eval} held-out inputs (higher is better). edgeq: no tuning run (default schedules, "
        "and edgeq's shipped tuning records where one beat the default on this CPU).",
        "",
        table,
        "",
        *[f"- {n}" for n in notes],
        *([f"- VNNI peak of one core of this CPU: {peak:.0f} GMAC/s (12 independent `vpdpbusd` chains, "
           "`harness.vnni_peak_gmacs`): the ceiling of any int8 conv here, for edgeq and ORT alike."] if peak else []),
    ]))


if __name__ == "__main__":
    main()
