"""Tuning: default schedules vs + shipped records vs MetaSchedule-tuned vs onnxruntime, fp32 and int8.

For each zoo model and precision: tune with a trial budget into a fresh work dir (the wall time is reported),
build with edgeq's default schedules only, with the shipped records (`edgeq tune --zoo`, read by every build),
and with the shipped plus the fresh records, and time them against onnxruntime (fp32: the same model; int8: ORT
`quantize_static` QDQ, as in int8.py) at 2 threads. The tuning curves of the last model go to
benchmarks/results/tuning_curves.png. Writes benchmarks/results/tuning.md.

    python benchmarks/tuning.py [--trials 64] [--models resnet18 mobilenet_v2] [--precisions fp32 int8]
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
import int8 as int8_bench  # noqa: E402
from edgeq import zoo  # noqa: E402

import edgeq  # noqa: E402
import targets  # noqa: E402
from edgeq.compiler import graph_module  # noqa: E402
from edgeq.report import plot_tuning_curves  # noqa: E402
from schedules import tune  # noqa: E402


ROUNDS = 5  # measurement rounds, each timing every build and onnxruntime once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=64, help="tuning budget per model and precision")
    parser.add_argument("--per-iteration", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(zoo.MODELS), choices=list(zoo.MODELS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    args = parser.parse_args()

    preset = targets.resolve("host")
    rows, notes, curves = [], [], None
    feed = {"input": np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    for key in args.models:
        name, build_model = zoo.MODELS[key]
        model = build_model(batch=1, image=224, seed=0)
        calibration = zoo.calibration()  # what `edgeq tune --zoo` used: the int8 kernels match the shipped ones
        for precision in args.precisions:
            work = Path(tempfile.mkdtemp(prefix="edgeq-tuning-"))
            quantized = edgeq.quantize(model, calibration) if precision == "int8" else None
            source = quantized if quantized is not None else model
            imported = quantized.source if quantized is not None else edgeq.load_onnx(model)
            builds = {"default": edgeq.build(source, "host", work / "default", shipped_tuning=False),
                      "shipped": edgeq.build(source, "host", work / "shipped")}
            if args.trials:
                start = time.perf_counter()
                result = tune.tune(graph_module(imported, preset, quantized.qdq if quantized else None), preset,
                                   work / "db", args.trials, per_iteration=args.per_iteration, progress=True)
                tune_s = time.perf_counter() - start
                builds["tuned"] = edgeq.build(source, "host", work / "tuned", tuning_db=work / "db")
                compared = [t for t in result.tasks if t.best_ms and t.default_ms]
                better = [t for t in compared if t.status == "tuned"]
                notes.append(f"{name} {precision}: {result.trials_run} fresh trials over "
                             f"{sum(t.trials > 0 for t in result.tasks)} of {len(result.tasks)} kernels in "
                             f"{tune_s:.0f} s (incl. the side-by-side timings); best record / default side by side: "
                             + ", ".join(f"{t.name} {t.best_ms / t.default_ms:.2f}×" for t in compared)
                             + f"; used for {len(better)} kernel(s)")
                curves = tune.report(result.directory)
            peer = int8_bench.ort_quantize(model, calibration["input"], work) if precision == "int8" else model
            # Interleaved rounds: this VM's speed drifts by tens of percent over minutes, which would otherwise
            # land on whichever build happened to be measured then.
            samples: dict[str, list[float]] = {k: [] for k in (*builds, "ort")}
            for _ in range(ROUNDS):
                for k, a in builds.items():
                    samples[k].append(a.benchmark(feed, repeat=4, threads=args.threads)["median_ms"])
                samples["ort"].append(harness.ort_latency_ms(peer, feed, args.threads, repeat=8))
            ms = {k: float(np.median(v)) for k, v in samples.items()}
            ort_ms = ms.pop("ort")
            same = max(np.abs(builds["default"].run(feed)["output"] - a.run(feed)["output"]).max()
                       for a in builds.values())
            shipped = builds["shipped"].manifest["tuning"]["tuned_kernels"]
            tuned = ms.get("tuned", ms["shipped"])
            rows.append([name, precision, f"{ms['default']:.2f}", f"{ms['shipped']:.2f} ({len(shipped)})",
                         f"{ms['tuned']:.2f}" if "tuned" in ms else "-", f"{ort_ms:.2f}",
                         f"{ms['default'] / ort_ms:.2f}×", f"**{tuned / ort_ms:.2f}×**",
                         f"{tuned / ms['default']:.2f}×"])
            print(rows[-1], flush=True)
            notes.append(f"{name} {precision}: shipped records used for {', '.join(shipped) or 'no kernel'}; "
                         f"max |difference| between the builds' outputs {same:.2g}")
    if curves:
        plot_tuning_curves(curves, Path(__file__).parent / "results" / "tuning_curves.png")
    table = harness.markdown_table(
        ["model (batch 1, 224²)", "precision", "default ms", "+ shipped ms (kernels)", "+ fresh tuning ms", "ORT ms",
         "default / ORT", "tuned / ORT", "tuned / default"], rows)
    harness.write_result("tuning", "\n".join([
        "# Tuning: edgeq untuned vs tuned vs onnxruntime",
        "",
        f"Machine: {harness.machine()}",
        "",
        f"Command: `python benchmarks/tuning.py --trials {args.trials}`. {args.threads} threads, batch 1, median "
        f"over {ROUNDS} interleaved rounds (each: every edgeq build 4 measurements, ORT 8). default = edgeq's default schedules only (`--no-shipped-tuning`); "
        "+ shipped = what every build gets: the records of `edgeq tune --zoo` in schedules/databases/ (how many "
        "kernels used one in brackets); "
        "+ fresh tuning = shipped plus a new MetaSchedule run (XGBoost cost model, gradient task scheduler, "
        f"{args.trials} trials per model and precision, {args.per_iteration} per round; none when 0); tuned = "
        "+ fresh tuning when run, else + shipped. A tuned schedule is only used where it beat the default by 3 % when "
        "the two were timed side by side (schedules/tune.py). "
        "ORT int8 = quantize_static QDQ (see int8.py). The shipped records' budget and time: zoo_tuning-<preset>.txt; "
        "tuning curves: tuning_curves.png (fresh runs), tuning_curves-<preset>.png (the shipped records).",
        "",
        table,
        "",
        *[f"- {n}" for n in notes],
    ]))


if __name__ == "__main__":
    main()
