"""The `edgeq` subcommands other than tune: each calls the library and prints what it did."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import EdgeqError
from .formatting import mb, precision, print_table


def cmd_compile(args) -> None:
    from . import build
    from .tensors import parse_input_shapes

    options = quantize_options(args)
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
          f"{m['library']['file']} {mb(artifact.size_bytes())})")
    if m["library"]["kind"] != "shared":
        print(f"note: {m['library']['note']}")
    untimed = m["tuning"]["untimed_kernels"]
    if untimed:
        print(f"warning: {len(untimed)} tuned kernels of the tuning database were not used: never timed beside the "
              f"default schedule ({', '.join(untimed[:3])}{', ...' if len(untimed) > 3 else ''}); run `edgeq tune` "
              "on that work dir again (no new trials) to time them", file=sys.stderr)


def quantize_options(args) -> dict:
    """The quantization flags (quantization_flags) as keyword arguments of edgeq.quantize."""
    if args.percentile is not None and args.calib_method != "percentile":
        raise EdgeqError("--percentile applies to --calib-method percentile only")
    low_bit = args.quantize not in (None, "int8", "auto")
    if args.fpsc and not low_bit:
        raise EdgeqError("--fpsc applies to the low-bit modes (--quantize w2a2, w2a8 or w4a4)")
    auto_flags = [flag for flag, given in (("--eval-data", args.eval_data), ("--labels", args.labels),
                                           ("--min-sqnr", args.min_sqnr is not None)) if given]
    if args.quantize != "auto" and auto_flags:
        raise EdgeqError(f"{', '.join(auto_flags)} appl{'ies' if len(auto_flags) == 1 else 'y'} to --quantize auto")
    options = {"method": args.calib_method, "per_channel": not args.per_tensor,
               "exclude": tuple(x for item in args.exclude or [] for x in item.split(",") if x)}
    if args.percentile is not None:
        options["percentile"] = args.percentile
    if low_bit:
        keep = args.keep_8bit.strip()
        options.update(keep_8bit=() if keep == "none" else tuple(x for x in keep.split(",") if x), fpsc=args.fpsc)
    if args.quantize == "auto":
        options.update(eval_data=args.eval_data, labels=args.labels, max_drop=args.max_drop,
                       objective=args.objective, min_sqnr=args.min_sqnr)
    return options


def _substitute_options(args) -> dict:
    return {"alpha": args.alpha, "budget": args.budget, "cost": args.cost}


def cmd_substitute(args) -> None:
    import targets
    from relay_passes.substitution import substitute

    from .compiler import graph_module
    from .frontend import load_onnx
    from .tensors import parse_input_shapes

    model = load_onnx(args.model, parse_input_shapes(args.input_shape))
    preset = targets.resolve(args.target)
    _, report = substitute(graph_module(model, preset), preset, **_substitute_options(args))
    print(report.format(verbose=args.report))


def cmd_sawb_fit(args) -> None:
    from relay_passes.quantize import sawb

    fit = sawb.fit_coefficients(args.bits)
    rows = [[name, f"{rms:.4f}", f"{mean_abs:.4f}", f"{best:.4f}", f"{fit.c1 * rms - fit.c2 * mean_abs:.4f}"]
            for name, (rms, mean_abs, best) in fit.points.items()]
    print_table(rows, ["distribution", "sqrt E[w^2]", "E|w|", "MSE-optimal alpha", "fitted alpha"])
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
    print_table(rows, ["threads", "mean ms", "median ms", "std ms", "min ms"])


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
          + ", ".join(precision(label, n, q.get("weights_by_precision", {}).get(label, {}))
                      for label, n in q["weight_bytes"].items()))
    if "policy" in q:
        from .report import policy_lines

        print("\n".join(policy_lines(q["policy"])))


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
    print_table(rows, ["preset", "arch", "features", "toolchain here", "device"])
    if args.json:
        print(json.dumps({p.name: {"target": p.target, "host": p.host} for p in targets.all_presets()}, indent=2))


def _device(args):
    from targets.rpc import Device

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
    print(f"wrote {out} ({mb(out.stat().st_size)}): copy it to the device and follow DEVICE.md inside")


def cmd_device(args) -> None:
    if args.action == "list":
        from targets.rpc import tracker_keys

        if not args.tracker:
            raise EdgeqError("device list needs --tracker HOST:PORT")
        rows = [[key, info.get("free", 0), info.get("pending", 0)] for key, info in tracker_keys(args.tracker).items()]
        print_table(rows, ["key", "free", "pending"])
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
    print_table(*layer_table(report))
    if args.json:
        write_json_atomic(Path(args.json), report)
    for path in (args.plot, args.json):
        if path:
            print(f"wrote {path}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.output)
