"""Malformed models, fuzzed: seeded mutations of the test zoo's models (tests/test_malformed.py: op types
swapped, inputs dropped, attributes and initializers corrupted, dtypes changed, nodes deleted or rewired), each
compiled with `edgeq compile MODEL --target host -o DIR` as a user would.

Every mutant ends as one of
  compiled   exit 0
  refused    exit 2, exactly one line on stderr (`edgeq: error: ...`), no output directory left
  messy      exit 2 but more stderr lines, or a half-written output directory
  internal   any other exit code (1: an internal error)
  crash      the process died (a signal)
  hang       no answer within --timeout seconds
Only the first two are acceptable. Mutants run in a worker process that is restarted after a crash or hang,
so one costs its mutant and not the run.

    python benchmarks/fuzz.py [--count 500] [--seed 2] [--timeout 120]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import harness  # noqa: E402

OUTCOMES = ("compiled", "refused", "messy", "internal", "crash", "hang")


def _worker(seed: int, start: int, count: int) -> None:
    """Compile mutants start..count-1 of the seeded sequence, one JSON line each."""
    import onnx

    from edgeq.cli import main
    from test_malformed import mutants

    with tempfile.TemporaryDirectory() as scratch:
        for index, model in enumerate(mutants(seed, count)):
            if index < start:
                continue
            path, out = Path(scratch, f"m{index}.onnx"), Path(scratch, f"out{index}")
            onnx.save(model, path)
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(["compile", str(path), "--target", "host", "-o", str(out)])
            lines = [line for line in err.getvalue().splitlines() if line.strip()]
            if code == 0:
                outcome = "compiled"
            elif code == 2:
                clean = len(lines) == 1 and lines[0].startswith("edgeq: error: ") and not out.exists()
                outcome = "refused" if clean else "messy"
            else:
                outcome = "internal"
            print(json.dumps({"index": index, "outcome": outcome, "message": (lines or [""])[-1][:200]}),
                  flush=True)


def run(seed: int, count: int, timeout: float) -> list[dict]:
    """Every mutant's outcome, restarting the worker past a mutant that crashed or hung."""
    results: list[dict] = []
    while len(results) < count:
        start = len(results)
        worker = subprocess.Popen([sys.executable, __file__, "--worker", str(seed), str(start), str(count)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        lines: list[str] = []

        def read(stream=worker.stdout):
            for line in iter(stream.readline, ""):
                lines.append(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        seen, last_progress = start, time.monotonic()
        while reader.is_alive():
            reader.join(1.0)
            if len(lines) > seen - start:
                seen, last_progress = start + len(lines), time.monotonic()
            elif time.monotonic() - last_progress > timeout:
                worker.kill()
                break
        worker.wait()
        results += [json.loads(line) for line in lines]
        if len(results) < count:  # the worker stopped before the end: the next mutant crashed or hung it
            hung = time.monotonic() - last_progress > timeout
            results.append({"index": len(results), "outcome": "hang" if hung else "crash",
                            "message": f"worker exit {worker.returncode}"})
        print(f"{len(results)}/{count}", file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--worker", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(*args.worker)
        return
    started = time.perf_counter()
    results = run(args.seed, args.count, args.timeout)
    counts = collections.Counter(r["outcome"] for r in results)
    bad = [r for r in results if r["outcome"] not in ("compiled", "refused")]
    refusals = collections.Counter(r["message"].split(":")[2].strip()[:60] if r["message"].count(":") > 1
                                   else r["message"] for r in results if r["outcome"] == "refused")
    harness.write_result("fuzz", "\n".join([
        "# Malformed models, fuzzed",
        "",
        f"Machine: {harness.machine()}. {args.count} mutants of the test zoo's models (seed {args.seed}), each "
        f"through `edgeq compile MODEL --target host -o DIR`, in {time.perf_counter() - started:.0f} s.",
        f"Command: `python benchmarks/fuzz.py --count {args.count} --seed {args.seed}`",
        "",
        harness.markdown_table(list(OUTCOMES), [[counts.get(o, 0) for o in OUTCOMES]]),
        "",
        "Not acceptable (anything but compiled / refused): " + (
            "none." if not bad else "; ".join(f"#{r['index']} {r['outcome']}: {r['message']}" for r in bad)),
        "",
        "Most common refusals:",
        "",
        harness.markdown_table(["refusal (start of the message)", "mutants"],
                               [[m.replace("|", "\\|"), n] for m, n in refusals.most_common(12)]),
    ]))


if __name__ == "__main__":
    main()
