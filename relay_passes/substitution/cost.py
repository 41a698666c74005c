"""Graph cost = sum of kernel costs (MetaFlow): measured on this machine, or estimated analytically.

Measured: the graph is first cut into the kernels TVM's FuseOps will make of it (`fusion_groups`: an op
followed by the elementwise ops that only it feeds, e.g. conv2d -> multiply -> add -> relu); each distinct
group (its signature: ops, attrs, wiring, input shapes/dtypes, which inputs are constants, target) is
compiled alone by TVM with the lowering pipeline the build uses, timed, and kept in a JSON cache so it is
measured once ever. Pricing ops one by one instead would charge an unfused conv -> scale -> shift -> relu
chain four kernels and four memory passes that the compiled model never runs, and the search would "win"
by folding them. Analytic: per op, FLOPs / peak + bytes moved / bandwidth + a per-kernel launch cost, for
targets this machine cannot run, and as the tie-breaker between equal measured costs. Both in ms.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from targets.atomic import write_atomic
from targets.errors import raise_if_interrupted

from . import ops
from .channels_last import channels_last
from .graph import STRUCTURAL, Graph, Node

# target kind -> (GFLOP/s, GB/s, launch µs): rough untuned-code figures; only ratios matter to the search
MACHINES = {"llvm": (8.0, 8.0, 3.0), "cuda": (2000.0, 200.0, 8.0)}
VIEWS = ("relax.reshape", "relax.squeeze", "relax.expand_dims", "relax.flatten")  # no data movement
TIE_BREAK = 1e-3  # weight of the analytic cost added to a measured one
BATCH = 64  # kernels measured per compile
MEASURED_AS = "channels-last"  # in cache keys: timings taken before kernels were measured channels-last differ


def _elems(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def _types(ty):
    """(shape, dtype) of every tensor in a (possibly tuple) type."""
    if hasattr(ty, "fields"):
        return [t for f in ty.fields for t in _types(f)]
    if getattr(ty, "shape", None) is None or not hasattr(ty.shape, "values"):
        return []
    try:
        return [(tuple(int(d) for d in ty.shape.values), str(ty.dtype))]
    except TypeError:  # symbolic dims
        return []


def _bytes(ty) -> int:
    return sum(_elems(s) * np.dtype(d).itemsize for s, d in _types(ty) if d not in ("", "void"))


def flops(g: Graph, node: Node) -> float:
    out = sum(_elems(s) for s, _ in _types(node.ty))
    if node.op in ("edgeq.conv2d", "relax.nn.conv2d"):
        w = g.nodes[node.inputs[1]].shape
        return 2.0 * out * _elems(w[1:]) + out * (len(node.inputs) - 2 + (node.attrs.get("act") is not None))
    if node.op in ("edgeq.matmul", "relax.matmul"):
        k = g.nodes[node.inputs[0]].shape[-1]
        return 2.0 * out * k + out * (len(node.inputs) - 2 + (node.attrs.get("act") is not None))
    if node.op == "relax.nn.batch_norm":
        return 2.0 * out
    return float(out)


def analytic(g: Graph, node: Node, kind: str = "llvm") -> float:
    """Estimated ms of one op: compute time + memory time + launch overhead."""
    gflops, gbps, launch_us = MACHINES.get(kind, MACHINES["llvm"])
    if node.op in STRUCTURAL:
        return 0.0
    if node.op in VIEWS:
        return launch_us * 1e-3 * 0.1
    moved = _bytes(node.ty) + sum(_bytes(g.nodes[i].ty) for i in node.inputs if g.nodes[i].op != "literal")
    return flops(g, node) / (gflops * 1e6) + moved / (gbps * 1e6) + launch_us * 1e-3


def signature(g: Graph, node: Node, target: str) -> str:
    """The cache key of an op: everything its run time depends on, none of its values."""
    ins = []
    for i in node.inputs:
        src = g.nodes[i]
        kind = "literal:" + str(src.value) if src.op == "literal" else ("const" if src.op == "const" else "var")
        ins.append([kind, [list(s) for s, _ in _types(src.ty)], [d for _, d in _types(src.ty)]])
    op = node.op if node.op != "relax.call_tir" else f"call_tir:{node.value.args[0]}"
    return json.dumps([op, sorted((k, repr(v)) for k, v in node.attrs.items()), ins, target])


def fusion_groups(g: Graph) -> list[list[int]]:
    """The graph's ops as the kernels FuseOps makes (an approximation), each group in topological order.

    An elementwise op joins the group of an op input whose only consumer it is and whose value is a tensor;
    the group's last op is then the only one read outside it. Everything else starts its own group.
    """
    users = g.users()
    group_of: dict[int, list[int]] = {}
    groups: list[list[int]] = []
    for nid in g.op_ids():
        node = g.nodes[nid]
        home = None
        if node.op in ops.ELEMENTWISE and hasattr(node.ty, "shape"):
            for i in node.inputs:
                grp = group_of.get(i)
                if (grp is not None and grp[-1] == i and users[i] == [nid] and i != g.output
                        and not hasattr(g.nodes[i].ty, "fields")):
                    home = grp
                    break
        if home is None:
            home = []
            groups.append(home)
        home.append(nid)
        group_of[nid] = home
    return groups


def group_signature(g: Graph, group: list[int], target: str) -> str:
    """The cache key of a fused group: its ops' signatures, inputs from inside the group by position.

    A fused op (edgeq.conv2d / edgeq.matmul with bias and activation) is keyed as the chain it lowers to
    (ops.EMIT), so a kernel the folds produce is the kernel already measured for the chain they folded.
    """
    rows, pos = [], {}
    for nid in group:
        node = g.nodes[nid]
        op, attrs, ins = json.loads(signature(g, node, target))[:3]
        ins = [["group", pos[i]] if i in pos else spec for i, spec in zip(node.inputs, ins)]
        if node.op in ops.FUSED:
            rows.append([op, [[k, "None" if k == "act" else v] for k, v in attrs], ins[:2]])
            if len(ins) > 2:
                rows.append(["relax.add", [], [["group", len(rows) - 1], ins[2]]])
            if node.attrs.get("act") is not None:
                rows.append([node.attrs["act"], [], [["group", len(rows) - 1]]])
        else:
            rows.append([op, attrs, ins])
        pos[nid] = len(rows) - 1
    return json.dumps(rows[0] + [target]) if len(rows) == 1 else json.dumps(["fused", rows, target])


def default_cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeq" / "op_costs.json"


class CostModel:
    """cost(graph) in ms with a per-op memo; `measured` needs a target this machine can run."""

    def __init__(self, target, measured: bool, cache: str | os.PathLike | None = None):
        self.target = target
        self.kind = target.kind.name
        self.measured = measured
        self.path = Path(cache) if cache is not None else default_cache_path()
        self.key = f"{target} {MEASURED_AS}"
        self.table: dict[str, float] = self._load() if measured else {}
        self.measurements = 0  # ops timed by this instance (the rest came from the cache)
        self._dirty = False
        self._memo: dict[str, float] = {}
        self._timers: dict[str, object] = {}  # key -> the compiled kernel's timer (compile_kernels), for retime

    @property
    def name(self) -> str:
        return (f"measured (TVM-compiled ops timed on this machine, cache {self.path})" if self.measured
                else f"analytic (FLOPs + bytes + launch overhead, {self.kind} figures)")

    def _load(self) -> dict:
        try:
            table = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return table if isinstance(table, dict) else {}

    def _save(self) -> None:
        """Atomic: merge with what other processes wrote, write a temp file, rename it over the cache.

        A cache that cannot be written (read-only home) only costs re-measuring next time.
        """
        try:
            write_atomic(self.path, json.dumps({**self._load(), **self.table}, indent=0, sort_keys=True))
        except OSError:
            pass

    def prefetch(self, graphs) -> None:
        """Measure every kernel of `graphs` not in the cache yet, BATCH to a compile (what pricing the graphs
        one by one would measure one compile each)."""
        self._measure([(g, group) for g in graphs for group in self.groups(g)])

    def _measure(self, kernels, again: bool = False) -> None:
        """Measure the (graph, group) kernels whose cache key is not in the table (``again``: all of them),
        BATCH to a compile.  A batch TVM cannot build is left to group_cost, which measures its kernels one by
        one and prices the ones that fail analytically (``again``: they keep their earlier timings)."""
        todo: dict[str, tuple[Graph, list[int]]] = {}
        for g, group in kernels:
            key = self._measured_key(g, group)
            if key is not None and (again or key not in self.table):
                todo.setdefault(key, (g, [nid for nid in group if g.nodes[nid].op not in STRUCTURAL]))
        keys = list(todo)
        for start in range(0, len(keys), BATCH):
            chunk = keys[start:start + BATCH]
            try:
                timers = compile_kernels([todo[k] for k in chunk], self.target)
            except Exception:  # noqa: BLE001 - see group_cost
                raise_if_interrupted()
                continue
            self.table.update((key, timer()) for key, timer in zip(chunk, timers))
            self._timers.update(zip(chunk, timers))
            self.measurements += len(chunk)
            self._save()

    def retime(self, a: Graph, b: Graph) -> tuple[float, float]:
        """cost(a), cost(b) with the kernels in one graph and not the other timed again, side by side.

        A search prices kernels in batches seconds apart (and the cache holds older timings still), while the
        machine's speed drifts by more than a merge gains: a search result came out priced above its input in 2
        of 8 cold searches.  Timed together the comparison is fair; the kernels both graphs share cancel out
        and keep their timings.  Kernels this model compiled are timed again as they are; the others (from
        the cache) are compiled first."""
        if not self.measured:
            return self(a), self(b)

        in_a, in_b = ({self._measured_key(g, group): (g, group) for group in self.groups(g)} for g in (a, b))
        differing = {key: kernel for key, kernel in {**in_a, **in_b}.items()
                     if key is not None and (key in in_a) != (key in in_b)}
        held = [key for key in differing if key in self._timers]  # the others are compiled and timed just now
        self._measure([kernel for key, kernel in differing.items() if key not in self._timers], again=True)
        self.table.update((key, self._timers[key]()) for key in held)
        if differing:
            self._memo.clear()
        return self(a), self(b)

    def _measured_key(self, g: Graph, group: list[int]) -> str | None:
        """The cache key of a kernel this model measures; None when it is priced analytically (or is empty)."""
        group = [nid for nid in group if g.nodes[nid].op not in STRUCTURAL]
        if not group or not self.measured or not all(_measurable(g.nodes[nid]) for nid in group):
            return None
        return group_signature(g, group, self.key)

    def op_cost(self, g: Graph, nid: int) -> float:
        return self.group_cost(g, [nid])

    def group_cost(self, g: Graph, group: list[int]) -> float:
        """Measured ms of the kernel `group` (fusion_groups) compiles to, plus the tie-breaker; analytic sum
        of its ops when it cannot be measured."""
        group = [nid for nid in group if g.nodes[nid].op not in STRUCTURAL]
        estimate = sum(analytic(g, g.nodes[nid], self.kind) for nid in group)
        key = self._measured_key(g, group)
        if key is None:
            return estimate
        if key not in self.table:
            try:
                self.table[key] = measure(g, group, self.target)
            except Exception:  # noqa: BLE001 - a kernel TVM cannot build alone is priced, not fatal
                raise_if_interrupted()
                return estimate
            self.measurements += 1
            self._dirty = True
        return self.table[key] + TIE_BREAK * estimate

    def groups(self, g: Graph) -> list[list[int]]:
        """What is priced as one unit: fused kernels when measuring, single ops for the analytic model."""
        return fusion_groups(g) if self.measured else [[nid] for nid in g.op_ids()]

    def __call__(self, g: Graph) -> float:
        self._dirty = False
        keyed = []
        for group in self.groups(g):
            pos = {nid: k for k, nid in enumerate(group)}
            keyed.append((repr([(g.nodes[n].digest(), [("group", pos[i]) if i in pos else self._shape_key(g, i)
                                                      for i in g.nodes[n].inputs]) for n in group]), group))
        self._measure([(g, group) for key, group in keyed if key not in self._memo])  # one compile for the new ones
        total = 0.0
        for key, group in keyed:
            if key not in self._memo:
                self._memo[key] = self.group_cost(g, group)
            total += self._memo[key]
        if self._dirty:
            self._save()
        return total

    @staticmethod
    def _shape_key(g, i):
        src = g.nodes[i]
        return (src.op == "const", src.digest() if src.op == "literal" else None, src.tkey)


def _measurable(node: Node) -> bool:
    """Ops a one-op module can reproduce: Relax ops and the fused ones (not call_tir / packed calls)."""
    return node.op.startswith(("relax.", "edgeq.")) and node.op not in ("relax.call_tir", "relax.call_packed")


def measure(g: Graph, nids, target, repeat: int = 5) -> float:
    """Best-of-`repeat` ms of the op (or fused group of ops, the last one the output) compiled alone."""
    return compile_kernels([(g, [nids] if isinstance(nids, int) else list(nids))], target)[0](repeat)


def compile_kernels(kernels, target) -> list:
    """For each (graph, group), a timer: call it for the kernel's best-of-`repeat` (default 5) ms.

    Every group is a function of its own (constants as they are, inputs from outside the group as random
    parameters), all compiled as one module and run by one VM: TVM's fixed cost per compile and per VM
    dominated a cold search. The compiled code lives as long as its timer, so a kernel is timed again
    without compiling it again. The minimum, not the mean: on a shared machine interference only ever adds
    time. Runs of >= 1 ms: best of 5 such runs scattered as little between repeated measurements as best of
    6 runs of >= 3 ms (median 0.5-1 % on the Inception-style model's kernels), in a quarter of the time.
    """
    import tvm
    from tvm import relax

    from schedules.lowering import lowering_pipeline

    rng = np.random.default_rng(0)
    functions, arg_types = {}, []
    for k, (g, group) in enumerate(kernels):
        function, types = _kernel_function(g, group)
        functions[f"kernel{k}"] = function.with_attr("global_symbol", f"kernel{k}")
        arg_types.append(types)
    with target:
        ex = tvm.compile(tvm.IRModule(functions), target, relax_pipeline=lowering_pipeline(target))
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)

    def timer(name, args):
        def best_ms(repeat: int = 5) -> float:
            evaluator = vm.time_evaluator(name, dev, number=1, repeat=repeat, min_repeat_ms=1)
            return float(np.min(evaluator(*args).results)) * 1e3
        return best_ms

    return [timer(name, [tvm.runtime.tensor(rng.standard_normal(s).astype(d), dev) for s, d in types])
            for name, types in zip(functions, arg_types)]


def _kernel_function(g: Graph, group: list[int]):
    """(Relax function computing `group` of `g`, (shape, dtype) of each of its parameters)."""
    from tvm import relax

    one = Graph(func_attrs=None)
    inside: dict[int, int] = {}

    def operand(i):
        src = g.nodes[i]
        if i in inside:
            return inside[i]
        if src.op in ("const", "literal"):
            return one.add(src)
        if src.op == "tuple":  # concat's operand: a tuple of separate inputs
            return one.add(src.with_inputs(operand(j) for j in src.inputs))
        one.params.append(one.add(Node("input", ty=src.ty, value=relax.Var(f"in{len(one.params)}", src.ty))))
        return one.params[-1]

    for nid in group:
        inside[nid] = one.add(g.nodes[nid].with_inputs([operand(i) for i in g.nodes[nid].inputs]))
    one.output = inside[group[-1]]
    one = channels_last(one)  # as the CPU build runs it (only CPU code is measured here)
    return one.to_relax(), [t for p in one.params for t in _types(one.nodes[p].ty)]


def can_measure(preset) -> bool:
    """Only code for this machine's CPU can be timed here."""
    from targets.detect import host_arch

    return not preset.is_gpu and preset.arch == host_arch() and "android" not in str(preset.target.get("mtriple", ""))


__all__ = ["CostModel", "analytic", "flops", "signature", "fusion_groups", "group_signature", "measure", "compile_kernels", "can_measure", "default_cache_path"]
