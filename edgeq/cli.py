"""The `edgeq` command: compile, tune, substitute, run, bench, eval, inspect, targets, deploy, demo.

Exit codes: 0 success, 2 bad input or usage (one line on stderr), 1 internal error (--verbose for the traceback).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import EdgeqError, one_line


QUANTIZE_MODES = ["int8", "w2a2", "w2a8", "w4a4"]  # edgeq.quantize.MODES, without importing TVM for --help


def _print_table(rows: list[list], header: list[str]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def cmd_compile(args) -> None:
    from . import build
    from .tensors import parse_input_shapes

    options = _quantize_options(args)
    artifact = build(args.model, target=args.target, out_dir=args.output,
                     input_shapes=parse_input_shapes(args.input_shape), progress=True,
                     quantize=args.quantize, calibration=args.calib, calib_method=options.pop("method"),
                     tuning_db=args.tuning_db, shipped_tuning=not args.no_shipped_tuning,
                     substitute=_substitute_options(args) if args.substitute else None, **options)
    m = artifact.manifest
    q = m["quantization"]
    mode = q["mode"] if q["mode"] == "fp32" else (
        f"{q['mode']}, {len(q.get('quantized_layers', []))} layers quantized ({q.get('method', q.get('source'))})")
    print(f"wrote {artifact.path} ({m['preset']}, {m['arch']}, {mode}, "
          f"{m['library']['file']} {_mb(artifact.size_bytes())})")
    if m["library"]["kind"] != "shared":
        print(f"note: {m['library']['note']}")
    untimed = m["tuning"]["untimed_kernels"]
    if untimed:
        print(f"warning: {len(untimed)} tuned kernels of the tuning database were not used: never timed beside the "
              f"default schedule ({', '.join(untimed[:3])}{', ...' if len(untimed) > 3 else ''}); run `edgeq tune` "
              "on that work dir again (no new trials) to time them", file=sys.stderr)


def _quantize_options(args) -> dict:
    """The quantization flags (quantization_flags) as keyword arguments of edgeq.quantize."""
    if args.percentile is not None and args.calib_method != "percentile":
        raise EdgeqError("--percentile applies to --calib-method percentile only")
    low_bit = args.quantize not in (None, "int8")
    if args.fpsc and not low_bit:
        raise EdgeqError("--fpsc applies to the low-bit modes (--quantize w2a2, w2a8 or w4a4)")
    options = {"method": args.calib_method, "per_channel": not args.per_tensor,
               "exclude": tuple(x for item in args.exclude or [] for x in item.split(",") if x)}
    if args.percentile is not None:
        options["percentile"] = args.percentile
    if low_bit:
        keep = args.keep_8bit.strip()
        options.update(keep_8bit=() if keep == "none" else tuple(x for x in keep.split(",") if x), fpsc=args.fpsc)
    return options


def _substitute_options(args) -> dict:
    return {"alpha": args.alpha, "budget": args.budget, "cost": args.cost}


def _remote(args):
    from schedules.tune import Remote

    from .deploy.rpc import parse_address

    if args.rpc and args.tracker:
        raise EdgeqError("give --rpc HOST:PORT or --tracker HOST:PORT --key KEY, not both")
    if args.tracker and not args.key:
        raise EdgeqError("--tracker needs --key (the device key registered with the tracker)")
    if not (args.rpc or args.tracker):
        return None
    host, port = parse_address(args.rpc or args.tracker)
    return Remote(host, port, key=args.key if args.tracker else None, timeout=args.timeout, retries=args.retries)


def cmd_substitute(args) -> None:
    import targets
    from relay_passes.substitution import substitute

    from .build import graph_module
    from .frontend import load_onnx
    from .tensors import parse_input_shapes

    model = load_onnx(args.model, parse_input_shapes(args.input_shape))
    preset = targets.resolve(args.target)
    _, report = substitute(graph_module(model, preset), preset, **_substitute_options(args))
    print(report.format(verbose=args.report))


def cmd_tune(args) -> None:
    import targets

    if args.report:
        _tune_report(args.report, args.plot)
        return
    if args.zoo is not None:
        _tune_zoo(args, targets.resolve(args.target))
        return
    if not args.model:
        raise EdgeqError("tune needs a model (or --zoo, or --report DIR)")
    from .errors import interruptible
    from .frontend import load_onnx
    from .quantize import quantize
    from .tensors import parse_input_shapes

    with interruptible():
        model = load_onnx(args.model, parse_input_shapes(args.input_shape))
        preset = targets.resolve(args.target)
        qdq = None
        if args.quantize:
            if not args.calib:
                raise EdgeqError(f"--quantize {args.quantize} needs calibration data (--calib)")
            qdq = quantize(model, args.calib, progress=True, mode=args.quantize, **_quantize_options(args)).qdq
        result = _tune_one(args, model, preset, qdq, args.work_dir)
    print(f"database: {result.directory} ({result.trials_run} trials this run); "
          f"apply it with: edgeq compile {args.model} --target {args.target} --tuning-db {args.work_dir} -o OUT")


def _tune_one(args, model, preset, qdq, work_dir):
    """Tune one (possibly quantized) model and print its per-task table."""
    from schedules import database as dbs
    from schedules import tune

    from .build import graph_module

    result = tune.tune(graph_module(model, preset, qdq), preset, work_dir, args.trials,
                       per_iteration=args.per_iteration, max_per_task=args.per_task, remote=_remote(args),
                       progress=True)
    for problem in result.problems:
        print(f"warning: {problem}", file=sys.stderr)
    rows = [[t.name[:48], t.status, t.trials, _ms(t.default_ms), _ms(t.best_ms),
             f"{t.default_ms / t.best_ms:.2f}x" if t.default_ms and t.best_ms else "-"] for t in result.tasks]
    _print_table(rows, ["task", "status", "trials", "default ms", "tuned ms", "speedup"])
    print("(default and tuned timed side by side; a tuned schedule is used where it wins by "
          f"{dbs.MARGIN:.0%} or more)")
    return result


def _tune_zoo(args, preset) -> None:
    """Tune every zoo model (fp32 and int8), `--trials` each, into the work dir, then ship the records that
    beat the default schedules: schedules/databases/<preset>/, which builds read automatically."""
    from schedules import database as dbs

    from . import zoo
    from .errors import interruptible
    from .frontend import load_onnx
    from .quantize import quantize

    with interruptible():
        for key in args.zoo or list(zoo.MODELS):
            name, build_model = zoo.MODELS[key]
            model = load_onnx(build_model())
            for precision in ("fp32", "int8"):
                print(f"{name} {precision}:", flush=True)
                start = time.perf_counter()
                qdq = quantize(model, zoo.calibration(), progress=True).qdq if precision == "int8" else None
                result = _tune_one(args, model, preset, qdq, args.work_dir)
                print(f"{name} {precision}: {result.trials_run} trials in {time.perf_counter() - start:.0f} s",
                      flush=True)
    shipped = dbs.target_dir(dbs.SHIPPED, preset)
    history = dbs.target_dir(args.work_dir, preset)
    kept = dbs.export_winners(history, shipped)
    print(f"shipped: {shipped} now holds {kept} tuned kernels that beat the defaults side by side; "
          f"builds for {preset.name} read it automatically (full history: {history})")


def _ms(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _tune_report(directory: str, plot: str | None) -> None:
    from pathlib import Path

    from schedules import tune

    try:
        rows = tune.report(directory)
    except FileNotFoundError:
        subdirs = [d for d in sorted(Path(directory).glob("*/")) if (d / "database_tuning_record.json").exists()]
        if not subdirs:
            raise EdgeqError(f"no tuning database in {directory}") from None
        for sub in subdirs:
            print(f"{sub.name}:")
            _tune_report(str(sub), None if plot is None else str(Path(plot).with_suffix(f".{sub.name}.png")))
        return
    table = [[r["task"][:48], r["trials"], _ms(r["best_ms"]), _ms(r["default_ms"]), _ms(r["tuned_ms"]),
              f"{r['default_ms'] / r['tuned_ms']:.2f}x" if r["default_ms"] and r["tuned_ms"] else "-",
              "yes" if r["used"] else "no", "yes" if r["complete"] else "no"] for r in rows]
    _print_table(table, ["task", "trials", "best record ms", "default ms", "tuned ms", "speedup", "used",
                         "complete"])
    if plot:
        from .report import plot_tuning_curves

        plot_tuning_curves(rows, plot)
        print(f"wrote {plot}")


def cmd_sawb_fit(args) -> None:
    from relay_passes.quantize import sawb

    fit = sawb.fit_coefficients(args.bits)
    rows = [[name, f"{rms:.4f}", f"{mean_abs:.4f}", f"{best:.4f}", f"{fit.c1 * rms - fit.c2 * mean_abs:.4f}"]
            for name, (rms, mean_abs, best) in fit.points.items()]
    _print_table(rows, ["distribution", "sqrt E[w^2]", "E|w|", "MSE-optimal alpha", "fitted alpha"])
    published = sawb.coefficients(args.bits)
    print(f"{args.bits}-bit SAWB fit: c1 = {fit.c1:.3f}, c2 = {fit.c2:.3f} (R^2 {fit.r2:.3f}, worst alpha error "
          f"{fit.max_rel_error:.1%}); published: " + (f"c1 = {published[0]}, c2 = {published[1]}" if published
                                                      else "none"))


def cmd_run(args) -> None:
    from . import Artifact
    from .artifact import write_npz_atomic
    from .tensors import load_arrays, random_inputs

    artifact = Artifact.load(args.artifact)
    inputs = load_arrays(args.input) if args.input else random_inputs(artifact.inputs)
    outputs = artifact.run(inputs)
    for name, value in outputs.items():
        flat = value.reshape(-1)
        print(f"{name}: {value.dtype}{list(value.shape)} min {flat.min():.6g} max {flat.max():.6g} "
              f"first {np.array2string(flat[:6], precision=5, separator=', ')}")
    if args.output:
        write_npz_atomic(Path(args.output), outputs)
        print(f"wrote {args.output}")


def cmd_bench(args) -> None:
    from . import Artifact
    from .tensors import load_arrays

    artifact = Artifact.load(args.artifact)
    inputs = load_arrays(args.input) if args.input else None
    rows = []
    for threads in args.threads or [None]:
        s = artifact.benchmark(inputs, repeat=args.repeat, threads=threads)
        rows.append([s["threads"], f"{s['mean_ms']:.3f}", f"{s['median_ms']:.3f}", f"{s['std_ms']:.3f}",
                     f"{s['min_ms']:.3f}"])
    print(f"{artifact.path} ({artifact.manifest['preset']}), {args.repeat} repeats")
    _print_table(rows, ["threads", "mean ms", "median ms", "std ms", "min ms"])


def _inspect_model(path: str) -> None:
    from .frontend import dtype_name, read_onnx, unsupported_ops

    proto, _ = read_onnx(path)
    graph = proto.graph
    init = {t.name for t in graph.initializer}
    params = sum(int(np.prod(t.dims)) for t in graph.initializer)
    print(f"{path}: ONNX ir_version {proto.ir_version}, opsets "
          + ", ".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in proto.opset_import)
          + f", {len(graph.node)} nodes, {params:,} parameters")
    for kind, values in (("input ", [v for v in graph.input if v.name not in init]), ("output", graph.output)):
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value or "?" for d in t.shape.dim]
            print(f"  {kind} {v.name}: {dtype_name(t.elem_type)}{dims}")
    print("  ops: " + ", ".join(f"{op}×{n}" for op, n in Counter(n.op_type for n in graph.node).most_common()))
    missing = unsupported_ops(proto)
    print("  unsupported: " + ("; ".join(f"{op} ({', '.join(nodes)})" for op, nodes in missing.items())
                               if missing else "none"))


def _inspect_artifact(path: str) -> None:
    from . import Artifact

    m = Artifact.load(path).manifest  # verifies checksums
    print(f"{path}: edgeq artifact v{m['format_version']} (edgeq {m['edgeq_version']}, TVM {m['tvm_version']}), "
          f"checksums ok")
    print(f"  model   {m['model']['name']} (sha256 {m['model']['sha256'][:16]}…, opset {m['model']['opset']})")
    print(f"  target  {m['preset']}: {json.dumps(m['target'])}" + (f" host {json.dumps(m['host_target'])}"
                                                                  if m["host_target"] else ""))
    print(f"  library {m['library']['file']} ({m['library']['kind']}, {m['arch']})")
    for s in m["inputs"]:
        print(f"  input   {s['name']}: {s['dtype']}{s['shape']}")
    for s in m["outputs"]:
        print(f"  output  {s['name']}: {s['dtype']}{s['shape']}")
    if "cuda" in m:
        print(f"  cuda    {m['cuda']['arch']}: {m['cuda']['kernels']}; nvcc check {m['cuda']['nvcc_check']}")
    q = m["quantization"]
    print(f"  weights {q['mode']}{' fpsc' if q.get('fpsc') else ''}: "
          + ", ".join(_precision(label, n, q.get("weights_by_precision", {}).get(label, {}))
                      for label, n in q["weight_bytes"].items()))


def _precision(label: str, nbytes: int, breakdown: dict) -> str:
    """'2-bit packed 1.2 KB (1/16.0 of their fp32 18.4 KB)' for the kernels' weights; bytes alone for the rest."""
    fp32 = breakdown.get("fp32_bytes")
    if not breakdown.get("layers") or not fp32:
        return f"{label} {_mb(nbytes)}"
    ratio = f"1/{fp32 / nbytes:.1f} of" if nbytes < fp32 else f"{nbytes / fp32:.1f}x"
    return f"{label} {_mb(nbytes)} ({ratio} their fp32 {_mb(fp32)})"


def cmd_inspect(args) -> None:
    if os.path.isdir(args.path):
        _inspect_artifact(args.path)
    elif os.path.isfile(args.path):
        _inspect_model(args.path)
    else:
        raise EdgeqError(f"cannot read {args.path}: no such file or directory")


def cmd_targets(args) -> None:
    import targets

    rows = []
    for p in targets.all_presets():
        rows.append([p.name, p.arch, ",".join(p.features) or "-", targets.toolchain_status(p), p.description])
    _print_table(rows, ["preset", "arch", "features", "toolchain here", "device"])
    if args.json:
        print(json.dumps({p.name: {"target": p.target, "host": p.host} for p in targets.all_presets()}, indent=2))


def _device(args):
    from .deploy.rpc import Device

    return Device(rpc=args.rpc, tracker=args.tracker, key=args.key, timeout=args.timeout)


def cmd_deploy(args) -> None:
    from .deploy.rpc import deploy
    from .tensors import load_arrays

    report = deploy(args.artifact, _device(args), load_arrays(args.input) if args.input else None,
                    repeat=args.repeat, compare=not args.no_compare)
    lat = report.latency_ms
    print(f"deployed {args.artifact} to {report.device} ({report.arch}): upload {report.upload_s:.2f} s")
    print(f"  latency  {lat['mean_ms']:.3f} ms mean, {lat['median_ms']:.3f} median, {lat['std_ms']:.3f} std, "
          f"{lat['min_ms']:.3f} min over {lat['repeat']} repeats (on the device)")
    if report.reference:
        errors = ", ".join(f"{k} {v:.3g}" for k, v in report.max_error.items())
        print(f"  match    {'yes' if report.match else 'NO'} vs host build (max abs error {errors})")
        if not report.match:
            raise EdgeqError(f"device outputs differ from the host build (max abs error {errors})")


def cmd_package(args) -> None:
    from .deploy.package import package

    out = package(args.artifact, args.output or f"{Path(args.artifact).resolve().name}.tar.gz")
    print(f"wrote {out} ({_mb(out.stat().st_size)}): copy it to the device and follow DEVICE.md inside")


def cmd_device(args) -> None:
    if args.action == "list":
        from .deploy.rpc import tracker_keys

        if not args.tracker:
            raise EdgeqError("device list needs --tracker HOST:PORT")
        rows = [[key, info.get("free", 0), info.get("pending", 0)] for key, info in tracker_keys(args.tracker).items()]
        _print_table(rows, ["key", "free", "pending"])
        return
    from .deploy import emulate

    if args.action == "emulate":
        dev = emulate.emulate(args.board, port=args.port or 9090, tracker=args.tracker, key=args.key)
        via = f"; registered with tracker {dev.tracker} as {dev.key!r}" if dev.tracker else ""
        print(f"emulated {dev.board} ({emulate.BOARDS[dev.board]}) listening on {dev.host}:{dev.port}{via}")
        print(f"  deploy with: edgeq deploy DIR --rpc {dev.host}:{dev.port}"
              + (f"  or  --tracker {dev.tracker} --key {dev.key}" if dev.tracker else ""))
    elif args.action == "stop":
        stopped = emulate.stop(args.port)
        print("stopped " + (", ".join(f"{d.board}@{d.port}" for d in stopped) if stopped else "nothing"))
    elif args.action == "tracker":
        emulate.start_tracker(args.port or 9190)
        print(f"tracker listening on 127.0.0.1:{args.port or 9190}")


def cmd_eval(args) -> None:
    from .artifact import write_json_atomic
    from .report import evaluate, format_report, layer_table

    report = evaluate(args.artifact, args.data, labels=args.labels, plot=args.plot)
    print(format_report(report, layers=False))
    print()
    _print_table(*layer_table(report))
    if args.json:
        write_json_atomic(Path(args.json), report)
    for path in (args.plot, args.json):
        if path:
            print(f"wrote {path}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.output)


def substitution_flags(p, switch: str | None = None) -> None:
    if switch:
        p.add_argument(switch, action="store_true", help="rewrite the graph with relaxed graph substitution first")
    p.add_argument("--alpha", type=float, default=1.05, help="search relaxation: keep graphs costing < alpha x best")
    p.add_argument("--budget", type=int, default=300, help="graphs the search may expand")
    p.add_argument("--cost", choices=["measured", "analytic"], default="measured",
                   help="op costs measured on this machine (cached) or estimated from FLOPs and bytes")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeq", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        # after the command too (edgeq compile m.onnx --verbose); SUPPRESS keeps a --verbose given before it
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        return p

    shape_help = "fix a dynamic input shape, e.g. image=1x3x224x224 (repeatable)"

    def quantization_flags(p, quantize_help):
        """compile's and tune's quantization flags: tuning must see the kernels the build will compile."""
        p.add_argument("--quantize", choices=QUANTIZE_MODES, help=quantize_help)
        p.add_argument("--keep-8bit", metavar="LAYERS", default="first,last",
                       help="low-bit modes: layers kept at 8 bits: 'first', 'last', node names (comma-separated; "
                       "'none' for none)")
        p.add_argument("--fpsc", action="store_true", help="low-bit modes: keep residual shortcuts at 8 bits (Choi "
                       "et al.'s fpsc): shortcut convs (e.g. a 1x1 downsample) and the tensors into and out of "
                       "residual Adds")
        p.add_argument("--calib", metavar="DATA", help="calibration inputs: .npz (keys = input names, samples on "
                       "axis 0) or a directory of .npy/.npz batches")
        p.add_argument("--calib-method", default="minmax", choices=["minmax", "percentile", "entropy", "mse"])
        p.add_argument("--percentile", type=float, help="for --calib-method percentile (default 99.99)")
        p.add_argument("--exclude", action="append", metavar="NODES",
                       help="keep these in float: node names, op types, 'first', 'last' (comma-separated, repeatable)")
        p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per channel")
    p = command("compile", cmd_compile, "compile an ONNX model into an artifact directory")
    p.add_argument("model", help="model.onnx")
    p.add_argument("--target", default="host", help="preset name (see `edgeq targets`) or a raw TVM target JSON")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help=shape_help)
    quantization_flags(p, "quantize with calibration data (--calib): int8 (w8a8), or SAWB weights / PACT "
                       "activations at 2 or 4 bits (w2a2, w2a8, w4a4) on bit-serial popcount kernels; models that "
                       "are already quantized (QDQ / QLinear ops) are compiled to integer kernels without this flag")
    p.add_argument("--tuning-db", metavar="DIR", help="apply the records of an `edgeq tune` work dir for this target")
    p.add_argument("--no-shipped-tuning", action="store_true",
                   help="do not use the pre-tuned records edgeq ships for the preset")
    substitution_flags(p, "--substitute")

    p = command("substitute", cmd_substitute, "rewrite a model's graph into a cheaper equivalent (MetaFlow) "
                "and report the rules applied, cost before/after and search time")
    p.add_argument("model", help="model.onnx")
    p.add_argument("--target", default="host", help="preset whose costs guide the search")
    p.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help=shape_help)
    p.add_argument("--report", action="store_true", help="also say what each applied rule does")
    substitution_flags(p)

    p = command("tune", cmd_tune, "tune a model's kernels with MetaSchedule into a resumable database")
    p.add_argument("model", nargs="?", help="model.onnx")
    p.add_argument("--zoo", nargs="*", choices=["resnet18", "mobilenet_v2"], metavar="MODEL",  # edgeq.zoo.MODELS
                   help="tune the zoo models (default: all: resnet18 mobilenet_v2), fp32 and int8, and add the "
                        "kernels that beat the defaults to the database edgeq ships (schedules/databases/), "
                        "which builds read automatically")
    p.add_argument("--target", default="host", help="preset name (see `edgeq targets`)")
    p.add_argument("--work-dir", default="edgeq-tuning", help="tuning work dir (one database per target)")
    p.add_argument("--trials", type=int, default=200, help="candidates to measure for this model "
                                                           "(--zoo: for each model and precision), in total")
    p.add_argument("--per-task", type=int, help="at most this many candidates per kernel")
    p.add_argument("--per-iteration", type=int, default=16, help="candidates measured per search round")
    p.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help=shape_help)
    quantization_flags(p, "tune the kernels of the model quantized as `edgeq compile` with the same flags would "
                          "(needs --calib)")
    p.add_argument("--rpc", metavar="HOST:PORT", help="measure on a TVM RPC server (no authentication)")
    p.add_argument("--tracker", metavar="HOST:PORT", help="measure on a device from a TVM RPC tracker")
    p.add_argument("--key", help="the device key registered with the tracker")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for one measurement session on the device")
    p.add_argument("--retries", type=int, default=3, help="connection attempts before the device counts as gone "
                                                          "(checked before tuning and after a round where nothing ran)")
    p.add_argument("--report", metavar="DIR", help="print the per-task table of a database (or work dir) instead")
    p.add_argument("--plot", metavar="PNG", help="with --report: write the tuning curves (best latency vs trials)")

    p = command("sawb-fit", cmd_sawb_fit, "re-derive the SAWB coefficients (c1, c2) the paper's way: MSE-optimal "
                "clipping over several weight distributions, then a linear fit")
    p.add_argument("--bits", type=int, default=2, help="weight bit width (2, 3, 4, ...)")

    p = command("run", cmd_run, "run an artifact on this machine")
    p.add_argument("artifact")
    p.add_argument("--input", help="inputs as .npz (keys = input names) or .npy; default: random")
    p.add_argument("-o", "--output", help="write the outputs to this .npz")

    p = command("bench", cmd_bench, "measure an artifact's latency on this machine")
    p.add_argument("artifact")
    p.add_argument("--input", help="inputs as .npz; default: random")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, action="append", help="thread count (repeatable); default: all cores")

    p = command("inspect", cmd_inspect, "describe an ONNX model or verify and describe an artifact")
    p.add_argument("path", help="model.onnx or an artifact directory")

    p = command("targets", cmd_targets, "list device presets and whether their toolchain is installed")
    p.add_argument("--json", action="store_true", help="also print each preset's TVM target JSON")

    p = command("deploy", cmd_deploy, "run an artifact on a device over TVM RPC, compare with a host build, time it")
    p.add_argument("artifact")
    p.add_argument("--rpc", metavar="HOST:PORT", help="a TVM RPC server (no authentication: use trusted networks)")
    p.add_argument("--tracker", metavar="HOST:PORT", help="a TVM RPC tracker")
    p.add_argument("--key", help="the device key registered with the tracker")
    p.add_argument("--input", help="inputs as .npz; default: random")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for each step on the device")
    p.add_argument("--no-compare", action="store_true", help="skip the host reference build")

    p = command("package", cmd_package, "bundle an artifact, a runner script and device instructions in a tarball")
    p.add_argument("artifact")
    p.add_argument("-o", "--output", help="tarball to write (default: ARTIFACT.tar.gz)")

    p = command("device", cmd_device, "emulated devices and a local tracker: emulate, stop, tracker, list")
    p.add_argument("action", choices=["emulate", "stop", "tracker", "list"])
    p.add_argument("board", nargs="?", default="rpi4", help="rpi3, rpi4 or rpi5 (for emulate)")
    p.add_argument("--port", type=int, default=None, help="port to listen on (emulate: 9090, tracker: 9190)")
    p.add_argument("--tracker", metavar="HOST:PORT", help="register with (emulate) or query (list) this tracker")
    p.add_argument("--key", help="device key to register under (default: the board name)")

    p = command("eval", cmd_eval, "measure what quantization cost: an int8 artifact against its fp32 model")
    p.add_argument("artifact", help="an int8 artifact directory")
    p.add_argument("--data", required=True, help="inputs as .npz (keys = input names, samples on axis 0)")
    p.add_argument("--labels", metavar="KEY", help="array of class indices in the .npz: also report accuracy")
    p.add_argument("--plot", metavar="PNG", help="write per-layer SQNR and output scatter plots (edgeq[plot])")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")

    p = command("demo", cmd_demo, "compile the bundled digits model for this machine, test and time it")
    p.add_argument("-o", "--output", help="keep the artifact in this directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.func(args)
        return 0
    except EdgeqError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"edgeq: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the cleanup at exit
    except Exception as e:  # a bug in edgeq or TVM: say so, keep the traceback behind --verbose
        if args.verbose:
            traceback.print_exc()
        print(f"edgeq: internal error: {type(e).__name__}: {one_line(e)} (rerun with --verbose for the traceback)",
              file=sys.stderr)
        return 1
    # Interrupted.  Said only now that the handler has dropped the traceback: the half-built TVM objects its
    # frames held are gone, and TVM's warnings about them ("BlockBuilder destroyed with remaining blocks")
    # come before this line instead of after it.
    gc.collect()
    print("edgeq: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
