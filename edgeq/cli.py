"""The `edgeq` command: compile, tune, substitute, run, bench, eval, inspect, targets, deploy, demo.

This module is the parser and the exit-code contract; the subcommands are edgeq.commands and
edgeq.tuning_commands. Exit codes: 0 success, 2 bad input or usage (one line on stderr), 1 internal error
(--verbose for the traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import traceback

from .commands import (cmd_bench, cmd_compile, cmd_demo, cmd_deploy, cmd_device, cmd_eval, cmd_inspect, cmd_package,
                       cmd_run, cmd_sawb_fit, cmd_substitute, cmd_targets)
from .errors import EdgeqError, one_line
from .tuning_commands import cmd_tune

QUANTIZE_MODES = ["int8", "w2a2", "w2a8", "w4a4", "auto"]  # edgeq.quantize.MODES, without importing TVM for --help


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
        p.add_argument("--eval-data", metavar="DATA", help="--quantize auto: the .npz each candidate policy is "
                       "scored on (keys = input names, plus --labels)")
        p.add_argument("--labels", metavar="KEY", help="--quantize auto: key of the class indices in --eval-data "
                       "(without it: top-1 agreement with fp32)")
        p.add_argument("--max-drop", type=float, default=1.0, metavar="PP",
                       help="--quantize auto: accuracy drop allowed, in percentage points (default 1)")
        p.add_argument("--min-sqnr", type=float, metavar="DB",
                       help="--quantize auto: an output-SQNR floor in dB instead of an accuracy budget")
        p.add_argument("--objective", choices=["size", "latency"], default="size",
                       help="--quantize auto: what the policy minimizes: weight bytes, or latency measured here")
    p = command("compile", cmd_compile, "compile an ONNX model into an artifact directory")
    p.add_argument("model", help="model.onnx")
    p.add_argument("--target", default="host", help="preset name (see `edgeq targets`) or a raw TVM target JSON")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help=shape_help)
    quantization_flags(p, "quantize with calibration data (--calib): int8 (w8a8), or SAWB weights / PACT "
                       "activations at 2 or 4 bits (w2a2, w2a8, w4a4) on bit-serial popcount kernels, or auto: "
                       "each layer's precision chosen by measurement on --eval-data within --max-drop; models that "
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
