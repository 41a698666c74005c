"""`edgeq tune`: tune a model (or the zoo, into the shipped databases) and print the per-task tables."""

from __future__ import annotations

import sys
import time

from .errors import EdgeqError
from .commands import quantize_options
from .formatting import ms, print_table


def _remote(args):
    from schedules.tune import Remote

    from targets.rpc import parse_address

    if args.rpc and args.tracker:
        raise EdgeqError("give --rpc HOST:PORT or --tracker HOST:PORT --key KEY, not both")
    if args.tracker and not args.key:
        raise EdgeqError("--tracker needs --key (the device key registered with the tracker)")
    if not (args.rpc or args.tracker):
        return None
    host, port = parse_address(args.rpc or args.tracker)
    return Remote(host, port, key=args.key if args.tracker else None, timeout=args.timeout, retries=args.retries)


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
            qdq = quantize(model, args.calib, progress=True, mode=args.quantize, **quantize_options(args)).qdq
        result = _tune_one(args, model, preset, qdq, args.work_dir)
    print(f"database: {result.directory} ({result.trials_run} trials this run); "
          f"apply it with: edgeq compile {args.model} --target {args.target} --tuning-db {args.work_dir} -o OUT")


def _tune_one(args, model, preset, qdq, work_dir):
    """Tune one (possibly quantized) model and print its per-task table."""
    from schedules import database as dbs
    from schedules import tune

    from .compiler import graph_module

    result = tune.tune(graph_module(model, preset, qdq), preset, work_dir, args.trials,
                       per_iteration=args.per_iteration, max_per_task=args.per_task, remote=_remote(args),
                       progress=True)
    for problem in result.problems:
        print(f"warning: {problem}", file=sys.stderr)
    rows = [[t.name[:48], t.status, t.trials, ms(t.default_ms), ms(t.best_ms),
             f"{t.default_ms / t.best_ms:.2f}x" if t.default_ms and t.best_ms else "-"] for t in result.tasks]
    print_table(rows, ["task", "status", "trials", "default ms", "tuned ms", "speedup"])
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
    table = [[r["task"][:48], r["trials"], ms(r["best_ms"]), ms(r["default_ms"]), ms(r["tuned_ms"]),
              f"{r['default_ms'] / r['tuned_ms']:.2f}x" if r["default_ms"] and r["tuned_ms"] else "-",
              "yes" if r["used"] else "no", "yes" if r["complete"] else "no"] for r in rows]
    print_table(table, ["task", "trials", "best record ms", "default ms", "tuned ms", "speedup", "used",
                         "complete"])
    if plot:
        from .report import plot_tuning_curves

        plot_tuning_curves(rows, plot)
        print(f"wrote {plot}")
