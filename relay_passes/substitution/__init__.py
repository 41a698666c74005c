"""Relaxed graph substitution (MetaFlow, Jia et al. SysML 2019) on a Relax module's `main`.

`substitute(mod, target)` lifts `main` into a dataflow graph, applies the folds that cannot lose
(rules.SIMPLIFY) and searches the rule table (rules.py) with MetaFlow's cost-bounded backtracking
(search.py), on parts cut at minimum vertex cuts when the graph is large (split.py), prices graphs with
measured costs of the fused kernels TVM will make of them, or analytic op costs (cost.py), and emits the
best graph back as Relax. With verify=True (the default) the rewritten module is run against the original on random
inputs, and a difference beyond fp32 tolerance raises EdgeqError instead of returning a different function.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from targets.errors import EdgeqError, one_line

from . import rules as rule_table
from .cost import CostModel, can_measure
from .graph import Graph, Unsupported
from .search import steps as search_steps
from .split import split_search

SPLIT_THRESHOLD = 64  # ops; larger graphs are cut and searched part by part
RTOL, ATOL = 1e-3, 1e-4  # fp32: rewrites reorder sums (folded weights, merged kernels)


@dataclass
class SubstitutionReport:
    applied: list[str] = field(default_factory=list)
    cost_before: float = 0.0
    cost_after: float = 0.0
    cost_model: str = ""
    search_seconds: float = 0.0
    alpha: float = 1.0
    budget: int = 0
    parts: int = 1
    ops_before: int = 0
    ops_after: int = 0
    verified: bool = False
    measurements: int = 0
    expansions: int = 0  # graphs popped from the search queue, over all parts
    note: str = ""

    @property
    def speedup(self) -> float:
        return self.cost_before / self.cost_after if self.cost_after else 1.0

    def summary(self) -> dict:
        """What the manifest records: the rules applied (with counts) and the cost estimate."""
        counts: dict[str, int] = {}
        for name in self.applied:
            counts[name] = counts.get(name, 0) + 1
        return {"applied": counts, "cost_before_ms": self.cost_before, "cost_after_ms": self.cost_after,
                "cost_model": self.cost_model, "alpha": self.alpha, "budget": self.budget,
                "search_seconds": round(self.search_seconds, 3), "verified": self.verified, "note": self.note}

    def format(self, verbose: bool = False) -> str:
        """The report as text; verbose adds what each applied rule does."""
        counts: dict[str, int] = {}
        for name in self.applied:
            counts[name] = counts.get(name, 0) + 1
        lines = [
            f"graph substitution: cost {self.cost_before:.4g} -> {self.cost_after:.4g} ms "
            f"({self.speedup:.2f}x), ops {self.ops_before} -> {self.ops_after}",
            f"  cost model: {self.cost_model}" + (f"; {self.measurements} op(s) measured" if self.measurements else ""),
            f"  search: alpha {self.alpha}, budget {self.budget}, {self.parts} part(s), "
            f"{self.expansions} expansion(s), {self.search_seconds:.2f} s",
            "  applied: " + (", ".join(f"{k} x{v}" if v > 1 else k for k, v in counts.items()) or "nothing"),
            f"  verified on random inputs: {'yes' if self.verified else 'no'}",
        ]
        if verbose:
            docs = {r.name: r.doc for r in rule_table.RULES}
            lines += [f"    {name}: {docs.get(name, '(custom rule)')}" for name in counts]
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


def substitute(mod, target=None, *, alpha: float = 1.05, budget: int = 300, cost: str = "measured",
               verify: bool = True, cache=None, rules=None, split_threshold: int = SPLIT_THRESHOLD):
    """Rewrite `main` of a Relax module into a cheaper equivalent graph: (new_mod, SubstitutionReport).

    target: preset name, raw target JSON or Preset (default: host). alpha: how much worse than the best a
    graph may be and still be explored (1 = greedy). budget: queue pops per searched part. cost: "measured"
    (ops timed on this machine, cached in `cache` or ~/.cache/edgeq/op_costs.json; falls back to analytic
    for targets this machine cannot run) or "analytic". rules: the rule table to search (default
    rules.RULES). Graphs with more than split_threshold ops are searched in parts (split.py).
    """
    import targets

    if cost not in ("measured", "analytic"):
        raise EdgeqError(f"unknown cost model {cost!r}; use 'measured' or 'analytic'")
    if alpha < 1.0 or budget < 0:
        raise EdgeqError(f"substitution needs alpha >= 1 and budget >= 0 (got alpha {alpha}, budget {budget})")
    preset = targets.resolve(target if target is not None else "host")
    tvm_target = targets.tvm_target(preset)
    measured = cost == "measured" and can_measure(preset)
    report = SubstitutionReport(alpha=alpha, budget=budget)
    if cost == "measured" and not measured:
        report.note = f"{preset.name} code cannot run on this machine: analytic cost used"
    from tvm import relax

    reason = _unsupported_signature(mod)
    if reason:
        report.note = f"module left unchanged: {reason}"
        return mod, report
    try:  # folded first so the importer's reshape(bias) and similar become the constants rules look for
        graph = Graph.from_relax(relax.transform.FoldConstant()(mod)["main"])
    except Unsupported as e:
        report.note = f"main left unchanged: {e}"
        return mod, report
    rules = tuple(rule_table.RULES if rules is None else rules)
    model = CostModel(tvm_target, measured, cache)
    report.cost_model = model.name
    start = time.perf_counter()
    graph = rule_table.lift(graph)
    report.cost_before, report.ops_before = model(graph), len(graph.op_ids())

    def run(part):
        part, folded = rule_table.simplify(part, rules)  # the never-slower folds first, then the search
        found = yield from search_steps(part, rules, model, alpha, budget)
        report.expansions += found.expansions
        return found.graph, folded + found.applied

    best, report.applied, report.parts = split_search(graph, rules, run, split_threshold, model.prefetch)
    report.cost_after = model(best)
    if set(report.applied) - set(rule_table.SIMPLIFY):  # the search rewrote more than the never-slower folds
        # Parts searched alone can recombine into kernels priced higher as a whole; and timings taken minutes
        # apart drift by more than a merge gains, so the kernels that differ from the folds alone are timed
        # again side by side (CostModel.retime) and the search's rewrites kept only if they still pay.
        folded, folds = rule_table.simplify(graph, rules)
        folded_cost, report.cost_after = model.retime(folded, best) if measured else (model(folded),
                                                                                     report.cost_after)
        if folded_cost <= report.cost_after:
            best, report.applied, report.cost_after = folded, folds, folded_cost
    report.ops_after = len(best.op_ids())
    # nothing gained: keep the module as it was. The folds are kept even when the measurement of the kernel
    # they leave came out no faster: it is the same fused kernel minus epilogue work, and a tie is noise.
    if report.cost_after >= report.cost_before and not set(report.applied) & set(rule_table.SIMPLIFY):
        best, report.applied, report.cost_after = graph, [], report.cost_before
    report.search_seconds = time.perf_counter() - start
    report.measurements = model.measurements
    if not report.applied:
        return mod, report
    new_mod = mod.clone() if hasattr(mod, "clone") else mod
    new_mod["main"] = best.to_relax()
    if verify:
        verify_same(mod, new_mod, report.applied)
        report.verified = True
    return new_mod, report


def _unsupported_signature(mod) -> str | None:
    """Why `main` cannot be searched and verified (random inputs need static tensor parameters), or None."""
    if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return "it has no main function"
    for p in mod["main"].params:
        try:
            [int(d) for d in p.ty.shape.values]
        except (AttributeError, TypeError):
            return f"parameter {p.name} is not a tensor of static shape"
    return None


def random_inputs(func, seed: int = 0) -> list[np.ndarray]:
    """One random array per parameter of `func`, from its static shape and dtype."""
    rng = np.random.default_rng(seed)
    arrays = []
    for p in func.params:
        shape = tuple(int(d) for d in p.ty.shape.values)
        dtype = np.dtype(str(p.ty.dtype))
        if dtype.kind == "f":
            arrays.append(rng.standard_normal(shape).astype(dtype))
        elif dtype.kind == "b":
            arrays.append(rng.random(shape) < 0.5)
        else:
            arrays.append(rng.integers(0, 2, shape).astype(dtype))
    return arrays


def run_functions(mod, names, inputs) -> list[list[np.ndarray]]:
    """Compile `mod` once for the host and run each named function on the same inputs."""
    import tvm
    from tvm import relax

    ex = tvm.compile(mod, tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    results = []
    for name in names:
        out = vm[name](*[tvm.runtime.tensor(a) for a in inputs])
        results.append(_flatten(out))
    return results


def _flatten(value) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    return [a for v in value for a in _flatten(v)]


def verify_same(original, rewritten, applied=(), seed: int = 0) -> None:
    """Run both `main`s on random inputs; EdgeqError if any output differs beyond fp32 tolerance."""
    both = rewritten.clone()
    both["edgeq_reference"] = original["main"].with_attr("global_symbol", "edgeq_reference")
    inputs = random_inputs(original["main"], seed)
    try:
        new, ref = run_functions(both, ["main", "edgeq_reference"], inputs)
    except (RuntimeError, ValueError, TypeError) as e:
        raise EdgeqError(f"graph substitution produced a module that does not run: {one_line(e)}") from None
    if len(new) != len(ref):
        raise EdgeqError("graph substitution changed the number of outputs; compile without --substitute")
    for k, (a, b) in enumerate(zip(new, ref)):
        magnitude = np.abs(b.astype(np.float64))
        scale = max(1.0, float(magnitude[np.isfinite(magnitude)].max(initial=0)))
        if a.shape != b.shape or not np.allclose(a, b, rtol=RTOL, atol=ATOL * scale, equal_nan=True):
            diff = float(np.abs(a.astype(np.float64) - b).max()) if a.shape == b.shape else float("inf")
            raise EdgeqError(f"graph substitution changed output {k} (max |difference| {diff:.3g}) after rules "
                             f"{', '.join(applied) or '(none)'}; compile without --substitute")


__all__ = ["substitute", "SubstitutionReport", "verify_same", "random_inputs", "run_functions"]
