"""ONNX conformance: onnx's own backend node tests (the case generators ship in the `onnx` package) run through
edgeq's ONNX backend, each case's outputs compared with the ones onnx generated (numpy reference code) at the
case's own tolerances.

Every case ends as one of
  pass      outputs equal the reference within the case's rtol/atol (float16: two float16 steps), with its
            shapes and dtypes
  refused   edgeq said why it cannot compile it (EdgeqError: exit 2 on the command line)
  wrong     compiled and ran, but an output differs
  internal  any other exception (a bug: exit 1 on the command line)
  crash     the process died (a signal) or hung past --timeout seconds
Cases run in worker processes, so a crash costs its case and not the run.

    python benchmarks/conformance.py [--cases PATTERN] [--first-per-op] [--workers 2] [-o results/conformance.md]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
import warnings

OUTCOMES = ("pass", "refused", "wrong", "internal", "crash")
# float16 outputs: the reference rounds every op's result to float16 in numpy's order of operations; another
# valid order (float32 accumulation, fused elementwise chains) lands up to two float16 steps (2^-10 relative
# each) away. The cases' own rtol (1e-3) is one step.
FLOAT16_RTOL = 2 ** -9
FLOAT16_ATOL = 2 ** -14  # the smallest normal float16


def node_cases() -> dict:
    """{case name: onnx TestCase} of every node test the installed onnx package generates."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the generators divide by zero on purpose
        import numpy as np

        with np.errstate(all="ignore"):
            return {case.name: case for case in collect_testcases(None)}


def op_of(case) -> str:
    """The op a node test is about: the op type of a one-node model; for a multi-node one (the expanded
    function bodies: test_clip_..._expanded) the op whose name, lowercased, is the longest prefix of the case's
    name without its underscores."""
    nodes = case.model.graph.node
    if len(nodes) == 1:
        return nodes[0].op_type
    import onnx

    ops = {schema.name.lower(): schema.name for schema in onnx.defs.get_all_schemas()}
    parts = case.name[len("test_"):].split("_")
    for k in range(len(parts), 0, -1):
        if "".join(parts[:k]).lower() in ops:
            return ops["".join(parts[:k]).lower()]
    return parts[0]


def _same(actual, expected, rtol: float, atol: float) -> str | None:
    """None if `actual` equals `expected` as the backend tests compare outputs, else what differs."""
    import numpy as np

    expected = np.asarray(expected)
    actual = np.asarray(actual)
    if actual.shape != expected.shape:
        return f"shape {list(actual.shape)} instead of {list(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"dtype {actual.dtype} instead of {expected.dtype}"
    if expected.dtype == np.float16:  # see FLOAT16_RTOL
        rtol, atol = max(rtol, FLOAT16_RTOL), max(atol, FLOAT16_ATOL)
    if expected.dtype.kind in "fc":
        bad = ~np.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
    else:
        bad = actual != expected
    if bad.any():
        return f"{int(bad.sum())} of {bad.size} values differ (max |diff| {np.max(np.abs(actual.astype(float) - expected.astype(float))):.3g})"
    return None


def run_case(case) -> tuple[str, str]:
    """(outcome, detail) of one case, in this process."""
    from edgeq.errors import EdgeqError, one_line
    from edgeq.onnx_backend import EdgeqBackend

    inputs, expected = case.data_sets[0]
    try:
        rep = EdgeqBackend.prepare(case.model)
        outputs = rep.run(list(inputs))
    except EdgeqError as e:
        return "refused", one_line(e, 200)
    except Exception as e:  # noqa: BLE001 - classifying every failure is the point
        return "internal", f"{type(e).__name__}: {one_line(e, 200)}"
    if len(outputs) != len(expected):
        return "wrong", f"{len(outputs)} outputs instead of {len(expected)}"
    for i, (a, b) in enumerate(zip(outputs, expected)):
        diff = _same(a, b, case.rtol, case.atol)
        if diff:
            return "wrong", f"output {i}: {diff}"
    return "pass", ""


def _worker(names: list[str]) -> None:
    """Run the named cases, one JSON line before and after each, so the parent knows which one a crash hit."""
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what TVM, onnxslim or C++ code prints goes to stderr, not into the protocol
    cases = node_cases()
    for name in names:
        print(json.dumps({"start": name}), file=channel, flush=True)
        outcome, detail = run_case(cases[name])
        print(json.dumps({"case": name, "outcome": outcome, "detail": detail}), file=channel, flush=True)


def run_isolated(names: list[str], workers: int = 2, timeout: float = 300, progress: bool = False) -> dict:
    """{case: (outcome, detail)} for the named cases, run by `workers` worker processes, each restarted after a
    crash or hang (the case it was running is recorded as crashed)."""
    import selectors

    pending = collections.deque(names)
    results: dict[str, tuple[str, str]] = {}
    chunk = max(1, len(names) // (workers * 4) or 1)
    running: dict = {}  # proc -> {"current": name, "since": t, "todo": [...], "buffer": str}
    sel = selectors.DefaultSelector()
    script = os.path.abspath(__file__)

    def launch():
        todo = [pending.popleft() for _ in range(min(chunk, len(pending)))]
        proc = subprocess.Popen([sys.executable, script, "--worker", *todo], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, bufsize=1)
        running[proc] = {"current": None, "since": time.monotonic(), "todo": todo}
        sel.register(proc.stdout, selectors.EVENT_READ, proc)

    def finish(proc, why: str | None):
        state = running.pop(proc)
        sel.unregister(proc.stdout)
        if why and state["current"] is not None:
            results[state["current"]] = ("crash", why)
        # cases the dead worker never reached go back to the queue
        pending.extendleft(reversed([n for n in state["todo"] if n not in results and n != state["current"]]))

    while pending or running:
        while pending and len(running) < workers:
            launch()
        for key, _ in sel.select(timeout=1.0):
            proc = key.data
            line = proc.stdout.readline()
            if not line:
                code = proc.wait()
                finish(proc, None if code == 0 else f"worker exited with {_signal_name(code)}")
                continue
            message = json.loads(line)
            state = running[proc]
            if "start" in message:
                state["current"], state["since"] = message["start"], time.monotonic()
            else:
                results[message["case"]] = (message["outcome"], message["detail"])
                state["current"] = None
                if progress:
                    print(f"\r{len(results)}/{len(names)}", end="", file=sys.stderr, flush=True)
        now = time.monotonic()
        for proc, state in list(running.items()):
            if state["current"] is not None and now - state["since"] > timeout:
                proc.kill()
                proc.wait()
                finish(proc, f"no result after {timeout:.0f} s")
    if progress:
        print(file=sys.stderr)
    return results


def _signal_name(code: int) -> str:
    import signal

    return signal.Signals(-code).name if code < 0 else f"exit code {code}"


def table(results: dict, cases: dict) -> str:
    """Markdown: totals, then one row per op with its counts and the first reason of each kind."""
    totals = collections.Counter(outcome for outcome, _ in results.values())
    by_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    reasons: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for name, (outcome, detail) in results.items():
        op = op_of(cases[name])
        by_op[op][outcome] += 1
        if outcome != "pass":
            reasons[op].setdefault(outcome, f"{name}: {detail}")
    lines = [f"| {' | '.join(OUTCOMES)} | cases |", "|" + "---|" * (len(OUTCOMES) + 1),
             f"| {' | '.join(str(totals[o]) for o in OUTCOMES)} | {len(results)} |", "",
             "| op | " + " | ".join(OUTCOMES) + " | first reason that is not a pass |",
             "|---|" + "---|" * len(OUTCOMES) + "---|"]
    for op in sorted(by_op):
        counts = by_op[op]
        why = "; ".join(reasons[op].values()).replace("|", "\\|")
        lines.append(f"| {op} | " + " | ".join(str(counts[o] or "") for o in OUTCOMES) + f" | {why[:300]} |")
    return "\n".join(lines)


def supported_ops(results: dict, cases: dict) -> list[str]:
    """Ops with at least one case that passed."""
    return sorted({op_of(cases[n]) for n, (outcome, _) in results.items() if outcome == "pass"})


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=".*", help="regular expression on case names")
    parser.add_argument("--first-per-op", action="store_true", help="only the first case of each op")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("-o", "--output", help="write the markdown report here")
    parser.add_argument("--json", help="write every case's outcome and reason here")
    args = parser.parse_args()
    cases = node_cases()
    names = sorted(n for n in cases if re.search(args.cases, n))
    if args.first_per_op:
        first: dict[str, str] = {}
        for n in names:
            first.setdefault(op_of(cases[n]), n)
        names = sorted(first.values())
    start = time.time()
    results = run_isolated(names, args.workers, args.timeout, progress=True)
    import onnx
    import tvm

    import targets

    header = (f"# ONNX node conformance\n\nonnx {onnx.__version__} node tests (every case its generators make), "
              f"edgeq backend, target host ({targets.tvm_target(targets.resolve('host')).attrs.get('mcpu', '')}), "
              f"TVM {tvm.__version__}; {len(names)} cases in {time.time() - start:.0f} s with {args.workers} workers. "
              f"Outputs compared at each case's rtol/atol; float16 outputs within two float16 steps "
              f"(rtol 2^-9), the rounding of the reference's own op order.\n"
              f"Command: `python benchmarks/conformance.py{' --first-per-op' if args.first_per_op else ''}`\n\n")
    report = header + table(results, cases) + "\n\nOps with a passing case: " + ", ".join(supported_ops(results, cases)) + "\n"
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({n: {"op": op_of(cases[n]), "outcome": o, "detail": d} for n, (o, d) in sorted(results.items())},
                      f, indent=1)


if __name__ == "__main__":
    main()
