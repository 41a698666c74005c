"""Graph substitution (MetaFlow, relay_passes/substitution/): end-to-end latency with vs without it.

Models (random seeded weights, ONNX built like edgeq/zoo.py): an Inception-style network (parallel
1x1 / 1x1->3x3 / 1x1->5x5 / pool->1x1 branches of one input, concatenated; 56² and 28² blocks, 64-256
channels) and ResNet-18. For each, the Relax module the build compiles (edgeq.compiler.graph_module) is compiled
by edgeq.compiler.codegen (edgeq lowering for host) as it is and after `substitute`, both executables are run on
the same input and compared, and their latencies are measured interleaved (A, B, A, B, ...) at the same
thread count so machine drift hits both alike. Then an alpha x budget sweep on the measured cost model, with
one op-cost cache shared by every search of the run (so the sweep does not re-measure). Writes
benchmarks/results/substitution.md.

    python benchmarks/substitution.py [--threads 1 2] [--rounds 11] [--cache PATH] [--models inception resnet18]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from edgeq import zoo  # noqa: E402

import targets  # noqa: E402
from edgeq.artifact import thread_count  # noqa: E402
from edgeq.compiler import codegen, graph_module  # noqa: E402
from edgeq.frontend import load_onnx  # noqa: E402
from relay_passes.substitution import rules as rule_table  # noqa: E402
from relay_passes.substitution import substitute  # noqa: E402

ALPHAS = (1.0, 1.01, 1.05)
BUDGETS = (100, 300, 1000)
DEFAULT = {"alpha": 1.05, "budget": 300}  # the pass's defaults: the end-to-end row uses these


# --- the Inception-style model ----------------------------------------------------------------------------------
def _concat(g: zoo._Net, parts: list[str]) -> str:
    stats = [g.stats[p] for p in parts]
    return g._op("Concat", parts, (float(np.mean([m for m, _ in stats])), float(np.mean([v for _, v in stats]))),
                 axis=1)


def _pool3(g: zoo._Net, x: str) -> str:
    """MaxPool 3x3, stride 1, same padding (the pool branch of an Inception block)."""
    mu, var = g.stats[x]
    return g._op("MaxPool", [x], (mu + 1.5 * math.sqrt(var), 0.5 * var),
                 kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])


def inception_block(g: zoo._Net, x: str, cin: int, c1: int, r3: int, c3: int, r5: int, c5: int, cp: int) -> str:
    """GoogLeNet's block: 1x1 | 1x1->3x3 | 1x1->5x5 | maxpool->1x1, conv-BN-ReLU each, concatenated."""
    b1 = g.conv_bn(x, cin, c1, 1)
    b3 = g.conv_bn(g.conv_bn(x, cin, r3, 1), r3, c3, 3)
    b5 = g.conv_bn(g.conv_bn(x, cin, r5, 1), r5, c5, 5)
    bp = g.conv_bn(_pool3(g, x), cin, cp, 1)
    return _concat(g, [b1, b3, b5, bp])


INCEPTION_BLOCKS = [  # (image, cin, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) -> out channels
    (56, 64, 32, 48, 64, 16, 32, 32),      # -> 160
    (56, 160, 32, 48, 64, 16, 32, 32),     # -> 160
    (28, 160, 64, 96, 128, 16, 32, 32),    # -> 256 (after a stride-2 pool)
    (28, 256, 64, 96, 128, 16, 32, 32),    # -> 256
    (28, 256, 64, 96, 128, 32, 64, 64),    # -> 320
]


def inception(batch: int = 1, image: int = 112, seed: int = 0):
    """Stem conv 3x3/2 (3 -> 64, 56²), two blocks at 56², max-pool /2, three blocks at 28², 1000-way head."""
    g = zoo._Net(seed)
    x = g.conv_bn("input", 3, 64, 3, stride=2)
    size = image // 2
    for spatial, cin, c1, r3, c3, r5, c5, cp in INCEPTION_BLOCKS:
        if spatial < size:
            x, size = g.maxpool(x), size // 2
        x = inception_block(g, x, cin, c1, r3, c3, r5, c5, cp)
    g.head(x, INCEPTION_BLOCKS[-1][2] + INCEPTION_BLOCKS[-1][4] + INCEPTION_BLOCKS[-1][6] + INCEPTION_BLOCKS[-1][7])
    return g.model("inception", batch, image)


# --- measurement --------------------------------------------------------------------------------------------------
def _vm(executable):
    import tvm
    from tvm import relax

    return relax.VirtualMachine(executable, tvm.cpu())


def _run(vm, x: np.ndarray) -> list[np.ndarray]:
    import tvm

    out = vm["main"](tvm.runtime.tensor(x))
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


def interleaved_ms(vms: list, x: np.ndarray, threads: int, rounds: int, min_repeat_ms: float = 100) -> list[list]:
    """Per VM, `rounds` mean latencies in ms (each over >= min_repeat_ms of runs), taken A, B, A, B, ... (the
    order alternating per round), so round k of every VM saw about the same machine."""
    import tvm

    timers = []
    for vm in vms:
        vm.set_input("main", tvm.runtime.tensor(x))
        timers.append(vm.time_evaluator("invoke_stateful", tvm.cpu(), number=1, repeat=1, min_repeat_ms=min_repeat_ms))
    samples = [[] for _ in vms]
    with thread_count(threads):
        for vm in vms:
            vm.invoke_stateful("main")  # warm-up
        for r in range(rounds):
            order = range(len(vms)) if r % 2 == 0 else reversed(range(len(vms)))
            for k in order:
                samples[k].append(float(np.mean(timers[k]("main").results)) * 1e3)
    return samples


def _counts(applied: list[str]) -> str:
    counts: dict[str, int] = {}
    for name in applied:
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{k} ×{v}" for k, v in counts.items()) or "nothing"


def bench_model(name: str, model, image: int, preset, args, cache: Path) -> dict:
    imported = load_onnx(model)
    base = graph_module(imported, preset)
    print(f"[{name}] searching (measured cost, alpha {DEFAULT['alpha']}, budget {DEFAULT['budget']})", flush=True)
    new, report = substitute(base, preset, cost="measured", cache=cache, **DEFAULT)
    print(report.format(), flush=True)
    start = time.perf_counter()
    ex_base = codegen(base, preset)
    ex_new = codegen(new, preset)
    compile_s = (time.perf_counter() - start) / 2
    x = np.random.default_rng(0).standard_normal((1, 3, image, image)).astype(np.float32)
    vm_base, vm_new = _vm(ex_base), _vm(ex_new)
    vms = [vm_base, vm_new, _vm(codegen(base, preset))]  # the third: A/A control, the noise floor of the ratio
    if set(report.applied) - set(rule_table.SIMPLIFY):  # also time the folds alone: what the other rewrites add
        folds_only = [r for r in rule_table.RULES if r.name in rule_table.SIMPLIFY]
        folded, _ = substitute(base, preset, cost="measured", cache=cache, rules=folds_only, verify=False)
        vms.append(_vm(codegen(folded, preset)))
    ref, got = _run(vm_base, x), _run(vm_new, x)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(got, ref))
    scale = max(float(np.abs(r).max()) for r in ref)
    same = all(np.allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, scale)) for a, b in zip(got, ref))
    timing = []
    for threads in args.threads:
        load = os.getloadavg()[0]
        a, b, aa, *c = interleaved_ms(vms, x, threads, args.rounds)
        load = max(load, os.getloadavg()[0])
        paired = float(np.median(np.array(b) / np.array(a)))
        folds = float(np.median(np.array(c[0]) / np.array(a))) if c else None
        timing.append({"threads": threads, "base_ms": float(np.median(a)), "new_ms": float(np.median(b)),
                       "paired": paired, "min_ratio": min(b) / min(a), "load": load, "folds": folds,
                       "aa": float(np.median(np.array(aa) / np.array(a)))})
        print(f"[{name}] {threads} thread(s): {np.median(a):.2f} ms -> {np.median(b):.2f} ms (paired {paired:.3f}x, "
              f"min {min(b) / min(a):.3f}x), load {load:.1f}, max |diff| {diff:.2g}", flush=True)

    sweep = []
    for alpha in ALPHAS:
        for budget in BUDGETS:
            _, r = substitute(base, preset, cost="measured", cache=cache, alpha=alpha, budget=budget, verify=False)
            sweep.append([name, alpha, budget, f"{r.cost_before:.2f}", f"{r.cost_after:.2f}",
                          f"{r.cost_after / r.cost_before:.3f}", r.expansions, r.measurements,
                          f"{r.search_seconds:.2f}", len(r.applied)])
            print(sweep[-1], flush=True)
    return {"name": name, "report": report, "timing": timing, "diff": diff, "same": same,
            "compile_s": compile_s, "sweep": sweep,
            "warm_s": next(float(row[8]) for row in sweep if (row[1], row[2]) == (DEFAULT["alpha"], DEFAULT["budget"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=11, help="interleaved timing rounds per model and thread count")
    parser.add_argument("--cache", type=Path, default=None,
                        help="op-cost cache (default: a fresh one, so the first search measures everything)")
    parser.add_argument("--models", nargs="+", default=["inception", "resnet18"])
    args = parser.parse_args()
    cache = args.cache or Path(tempfile.mkdtemp(prefix="edgeq-subst-")) / "op_costs.json"
    preset = targets.resolve("host")
    start = time.perf_counter()
    results = []
    builders = {"inception": ("Inception-style (112² in, 56²/28² blocks)", inception, 112),
                "resnet18": ("ResNet-18 (224²)", zoo.resnet18, 224)}
    for key in args.models:
        label, build_model, image = builders[key]
        results.append(bench_model(label, build_model(batch=1, image=image, seed=0), image, preset, args, cache))
    total = time.perf_counter() - start

    main_rows, sweep_rows = [], []
    for res in results:
        r = res["report"]
        for t in res["timing"]:
            main_rows.append([
                res["name"], t["threads"], f"{t['base_ms']:.2f}", f"{t['new_ms']:.2f}", f"**{t['paired']:.2f}×**",
                f"{t['min_ratio']:.2f}×", f"{t['aa']:.2f}×", "-" if t["folds"] is None else f"{t['folds']:.2f}×", f"{t['load']:.1f}", f"{r.cost_before:.2f} → {r.cost_after:.2f}",
                f"{r.ops_before} → {r.ops_after}", f"{r.search_seconds:.1f} / {res['warm_s']:.1f}", r.measurements,
                _counts(r.applied), f"{'yes' if res['same'] else 'NO'} ({res['diff']:.1g})"])
        sweep_rows += res["sweep"]
    text = "\n".join([
        "# Graph substitution (MetaFlow): end-to-end latency with vs without",
        "",
        f"Machine: {harness.machine()}",
        "",
        f"Command: `nice -n 5 python benchmarks/substitution.py` (total run {total / 60:.1f} min). "
        "Both executables are the build's Relax module (`graph_module`) compiled by `codegen` (edgeq lowering for "
        "host, default schedules), one with `substitute(cost=\"measured\", alpha=1.05, budget=300)` applied; "
        f"without / with ms = median of {args.rounds} interleaved rounds (each the mean of ≥ 100 ms of runs); "
        "\"paired\" = median over rounds of (with / without) in the same round, the drift-cancelling ratio; "
        "\"ratio of minima\" = best round with / best round without (interference only adds time). "
        "The measured cost model prices the fused kernels TVM will compile (cost.fusion_groups), each compiled "
        "and timed alone in the layout the CPU build runs it in (channels-last, relay_passes/substitution/"
        "channels_last.py), at the TVM thread pool's default size (2 here: compare \"cost est.\" with the 2-thread "
        "row); \"cold\" search time includes measuring every kernel not yet in the cost cache (the "
        "cache starts empty), \"warm\" is the same search again from the sweep below. \"load avg\": the "
        "machine's 1-minute load average around the timing (2 cores shared with other jobs: absolute ms move "
        "with it; above ~2 the ratios are noisy to ±10 %, see the spread between paired and minima). "
        "\"A/A control\": the unsubstituted module compiled a second time and timed in the same rounds, "
        "paired against the first: how far from 1.00 noise alone moves a ratio in this run. "
        "\"folds only\": where the search applied more than the never-slower folds (rules.SIMPLIFY), a third "
        "executable with only those, timed in the same rounds (paired ratio), to show what the other rewrites add. "
        "\"outputs equal\": the two compiled models on one random input, rtol 1e-3 (max |difference| in brackets).",
        "",
        harness.markdown_table(
            ["model (batch 1)", "threads", "without ms", "with ms", "with / without (paired)", "ratio of minima",
             "A/A control", "folds only / without", "load avg", "cost est. ms", "ops", "search s (cold / warm)",
             "kernels measured", "rules applied", "outputs equal"], main_rows),
        "",
        "Reading: the build's graph passes already fold BatchNormalization into the conv (relay_passes/pipeline.py) "
        "and TVM's FuseOps compiles conv → bias → relu into one kernel, so the folds (conv_bias/act) only "
        "rename kernels that exist either way: ~1.00× by construction. Gains must come from the merges, which "
        "on this CPU trade two or three conv calls for one wider conv plus a split copy (strided, in NHWC): "
        "priced that way the search finds no merge that pays and keeps the folds alone.",
        "",
        "## α × budget sweep (measured cost model, cache shared with the row above: no re-measuring)",
        "",
        harness.markdown_table(
            ["model", "α", "budget", "cost before ms", "cost after ms", "after / before", "expansions",
             "new measurements", "search s", "rewrites"], sweep_rows),
    ])
    harness.write_result("substitution", text)


if __name__ == "__main__":
    main()
