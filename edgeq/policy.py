"""Precision chosen per layer: the cheapest assignment whose measured accuracy drop stays within the user's budget.

NNCF's accuracy-aware quantization reverts the most sensitive layers to float until the drop is met; HAQ and AMC
choose bits per layer with hardware feedback.  This search measures both sides: every candidate assignment
(each weighted layer at fp32, int8, w4a4, w2a8 or w2a2) is written as a QDQ model by the ordinary quantizer
(``Policy.exclude`` for float layers, ``Policy.layer_bits`` for the rest; calibrated ranges are shared between
candidates) and scored on the evaluation data by onnxruntime's unfused run of that QDQ model, which computes on
the grid edgeq's kernels compute on, up to rounding.  The objective is the layers' weight bytes (``size``) or
their latency measured on this machine (``latency``, edgeq.layer_latency), summed.

Search: start from the cheapest precision of every layer and measure each layer raised alone (its sensitivity);
while the drop is over budget, raise the layer whose raise measures the best score gain per unit of cost (lazy
greedy: stale gains are re-measured before they are taken); then backtrack: lower a layer, alone or while
raising another one step, where the budget still holds and the objective falls (moves ranked by the measured
sensitivities).  The single-mode assignments (int8, fp32; each low-bit mode with its first and last layers
8-bit) are scored too.  Then the search's assignment and the single modes are built by edgeq and measured with
its own kernels (accuracy on the data; the artifact's weight bytes, or latency in interleaved rounds): the
cheapest that meets the budget is the answer, so it is never worse than the best single mode, as built.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from .errors import EdgeqError

PRECISIONS = {"fp32": (32, 32), "int8": (8, 8), "w4a4": (4, 4), "w2a8": (2, 8), "w2a2": (2, 2)}  # (weight, act)
OBJECTIVES = ("size", "latency")
MAX_EVALUATIONS = 300
LATENCY_ROUNDS = 7  # rounds of the final builds' latency comparison
BACKTRACK_TRIES = 4  # moves measured per backtracking round, beyond one per layer


@dataclass(frozen=True)
class Layer:
    """A weighted layer the policy assigns: its node, op type, weight element count and allowed precisions."""

    node: str
    op_type: str
    weights: int
    precisions: tuple[str, ...]  # cheapest first

    def weight_bytes(self, precision: str) -> float:
        return self.weights * PRECISIONS[precision][0] / 8


@dataclass
class Evaluation:
    """One assignment as measured: its objective (estimated from per-layer costs) and score on the data."""

    assignment: dict[str, str]
    objective: float
    score: float
    drop: float
    label: str = ""  # "int8", "w2a2" for single-mode points; "" for search steps

    def summary(self) -> dict:
        return {"objective": self.objective, "score": self.score, "drop": self.drop,
                **({"label": self.label} if self.label else {})}


@dataclass
class Metric:
    """How an assignment is scored: accuracy with labels, else top-1 agreement with fp32 (percent); with
    ``min_sqnr``, the first output's SQNR in dB, which must stay >= it.

    The accuracy drop counts the samples fp32 classifies right and the quantized model wrong, in percentage
    points: samples it newly gets right do not offset them.  On a few hundred evaluation samples such gains are
    mostly chance, and a search that may trade losses for lucky gains picks assignments whose drop does not
    hold on other data."""

    reference: np.ndarray  # fp32 first output over the data
    labels: np.ndarray | None = None
    min_sqnr: float | None = None

    @property
    def name(self) -> str:
        return "sqnr_db" if self.min_sqnr is not None else "accuracy" if self.labels is not None else "top1_agreement"

    def _target(self) -> np.ndarray:
        return self.labels if self.labels is not None else self.reference.argmax(-1).reshape(-1)

    def score(self, output: np.ndarray) -> float:
        from .report import sqnr_db

        if self.min_sqnr is not None:
            value = sqnr_db(self.reference, output)
            return float("inf") if value is None else value
        return 100.0 * float(np.mean(output.argmax(-1).reshape(-1) == self._target()))

    def measure(self, output: np.ndarray) -> tuple[float, float]:
        """(score, drop) of a quantized model's first output."""
        score = self.score(output)
        if self.min_sqnr is not None:
            return score, self.min_sqnr - score
        target = self._target()
        right = self.reference.argmax(-1).reshape(-1) == target
        lost = right & (output.argmax(-1).reshape(-1) != target)
        return score, 100.0 * float(np.mean(lost))

    def meets(self, drop: float, max_drop: float) -> bool:
        return drop <= (0.0 if self.min_sqnr is not None else max_drop) + 1e-9


@dataclass
class PolicyResult:
    """The chosen assignment, the quantized model it gives, and every assignment measured on the way."""

    quantized: object  # edgeq.QuantizedModel (mode "auto")
    assignment: dict[str, str]
    why: dict[str, str]
    chosen: Evaluation
    fp32_score: float
    metric: str
    objective: str
    max_drop: float
    evaluations: list[Evaluation] = field(default_factory=list)
    verified: dict | None = None  # the builds measured with edgeq's own kernels (see _verify)
    sensitivity: dict = field(default_factory=dict)  # {node: {precision: score}}, one layer raised alone
    min_sqnr: float | None = None

    def summary(self) -> dict:
        return {"objective": self.objective, "metric": self.metric, "max_drop": self.max_drop,
                **({"min_sqnr": self.min_sqnr} if self.min_sqnr is not None else {}),
                "fp32_score": self.fp32_score, "proxy": {"source": "onnxruntime (QDQ)", **self.chosen.summary()},
                **({"verified": self.verified} if self.verified else {}),
                "layers": [{"node": node, "precision": p, "why": self.why.get(node, ""),
                            "sensitivity": self.sensitivity.get(node, {})} for node, p in self.assignment.items()],
                "evaluated": [e.summary() for e in self.evaluations]}


class _Search:
    """The measured assignments of one model: quantize (shared ranges), run in onnxruntime, score, remember."""

    def __init__(self, imported, calibration: list, data: list, metric: Metric, method: str, per_channel: bool,
                 costs: dict, max_drop: float, progress: bool):
        from tqdm import tqdm

        from .calibration import tapped_runner

        self.imported, self.calibration, self.data, self.metric = imported, calibration, data, metric
        self.method, self.per_channel, self.costs, self.max_drop = method, per_channel, costs, max_drop
        self.known: dict = {}  # calibrated ranges, shared by every candidate
        self.make_run = lambda prepared, taps: tapped_runner(prepared, taps)[1]
        self.fp32_score = metric.score(metric.reference)
        self.seen: dict[tuple, Evaluation] = {}
        self.evaluations: list[Evaluation] = []
        self.sensitivity: dict[str, dict[str, float]] = {}  # score with one layer raised from the cheapest start
        self.bar = tqdm(desc="policy search", unit="policy", disable=None if progress else True, leave=False)

    def policy(self, assignment: dict[str, str]):
        from relay_passes.quantize import Policy

        return Policy(per_channel=self.per_channel, keep_8bit=(),
                      exclude=tuple(n for n, p in assignment.items() if p == "fp32"),
                      layer_bits={n: PRECISIONS[p] for n, p in assignment.items() if p not in ("fp32", "int8")})

    def quantize(self, assignment: dict[str, str]):
        from relay_passes.quantize import quantize_onnx

        return quantize_onnx(self.imported.onnx_model, self.make_run, self.calibration, self.method,
                             self.policy(assignment), known=self.known)

    def measure(self, assignment: dict[str, str]) -> tuple[float, float]:
        """The assignment's (score, drop): its QDQ model run by onnxruntime on the evaluation data."""
        return self.metric.measure(_onnxruntime_first_output(self.quantize(assignment).model, self.data))

    def objective(self, assignment: dict[str, str]) -> float:
        return float(sum(self.costs[node][p] for node, p in assignment.items()))

    def evaluate(self, assignment: dict[str, str], label: str = "") -> Evaluation:
        from targets.errors import raise_if_interrupted

        key = _key(assignment)
        if key in self.seen:
            self.seen[key].label = self.seen[key].label or label  # a search step that is also a single mode
            return self.seen[key]
        raise_if_interrupted()
        if len(self.evaluations) >= MAX_EVALUATIONS:
            raise _OutOfEvaluations
        score, drop = self.measure(assignment)
        result = Evaluation(dict(assignment), self.objective(assignment), score, drop, label)
        self.seen[key] = result
        self.evaluations.append(result)
        self.bar.update(1)
        self.bar.set_postfix_str(f"last: objective {result.objective:.4g}, drop {result.drop:.2f}")
        return result

    def objective_of_levels(self, options: dict):
        """Sort key: the objective of an assignment given as {node: index into options[node]}."""
        return lambda levels: self.objective({node: options[node][i] for node, i in levels.items()})

    def meets(self, evaluation: Evaluation) -> bool:
        return self.metric.meets(evaluation.drop, self.max_drop)


class _OutOfEvaluations(Exception):
    pass


def layers_of(model, precisions: tuple[str, ...]) -> list[Layer]:
    """The weighted layers a policy assigns (what int8 quantizes), with the precisions each can take."""
    from onnx import numpy_helper

    from relay_passes.quantize import Policy, annotate, prepare

    prepared = annotate.name_nodes(annotate.upgrade_opset(prepare.fold_batch_norm(model)))
    plan = annotate.plan(prepared, Policy())
    nodes = {n.name: n for n in prepared.graph.node}
    sizes = {t.name: int(np.prod(t.dims)) for t in prepared.graph.initializer}
    sizes |= {n.output[0]: int(numpy_helper.to_array(a.t).size) for n in prepared.graph.node
              if n.op_type == "Constant" for a in n.attribute if a.name == "value"}
    layers = []
    for group in plan.groups:
        if group.weight is None:
            continue
        allowed = [p for p in precisions if PRECISIONS[p][0] >= 8 or annotate.low_bit_capable(group, nodes)]
        layers.append(Layer(group.node, group.op_type, sizes.get(group.weight, 0), tuple(allowed)))
    return layers


def search(model, calibration, eval_data, labels: str | None = None, max_drop: float = 1.0,
           objective: str = "size", precisions: tuple[str, ...] = tuple(PRECISIONS), min_sqnr: float | None = None,
           method: str = "minmax", per_channel: bool = True, verify: bool = True, progress: bool = False,
           **latency_options) -> PolicyResult:
    """The per-layer precision assignment that minimizes ``objective`` with the accuracy drop <= ``max_drop``
    percentage points on ``eval_data`` (.npz or {name: samples}; ``labels`` its key of class indices, else top-1
    agreement with fp32; ``min_sqnr``: an output-SQNR floor in dB instead).  Returns a PolicyResult whose
    ``quantized`` builds with edgeq.build; with ``verify`` it was built and scored with edgeq's kernels."""
    from .calibration import calibration_batches
    from .frontend import ImportedModel, load_onnx
    from .quantize import QuantizedModel
    from .report import _batches, _is_classifier, _labels, _sample_count
    from .tensors import load_arrays

    if objective not in OBJECTIVES:
        raise EdgeqError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise EdgeqError(f"unknown precision(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(PRECISIONS)}")
    if max_drop < 0:
        raise EdgeqError(f"--max-drop must be >= 0 percentage points, got {max_drop}")
    imported = model if isinstance(model, ImportedModel) else load_onnx(model)
    arrays = load_arrays(eval_data) if not isinstance(eval_data, dict) else dict(eval_data)
    batches = _batches(arrays, imported.inputs)
    used = len(batches) * (imported.inputs[0].shape[0] if imported.inputs[0].shape else 1)
    classifier = _is_classifier(imported.outputs[0].shape)
    if min_sqnr is None and not classifier:
        raise EdgeqError(f"{imported.outputs[0].name} (shape {list(imported.outputs[0].shape)}) is not a "
                         "classifier output: give an SQNR floor (--min-sqnr DB) instead of an accuracy budget")
    label_values = None
    if labels is not None:
        total = _sample_count(arrays[imported.inputs[0].name], imported.inputs[0])
        label_values = _labels(arrays, labels, total, eval_data)[:used]
    reference = _onnxruntime_first_output(imported.onnx_model, batches)
    metric = Metric(reference, label_values, min_sqnr)
    layers = layers_of(imported.onnx_model, tuple(precisions))
    if not layers:
        raise EdgeqError(f"{imported.name} has no layer to quantize (no conv/matmul/gemm with constant weights)")
    stuck = [layer.node for layer in layers if not layer.precisions]
    if stuck:
        raise EdgeqError(f"{', '.join(stuck)} take no low-bit weights (grouped/depthwise convolutions): allow "
                         "int8 or fp32 among the precisions")
    costs = _costs(imported, layers, objective, latency_options, progress)
    options = [_undominated(layer, costs[layer.node]) for layer in layers]  # what the search moves between
    calib_batches = list(calibration_batches(calibration, imported.inputs))
    state = _Search(imported, calib_batches, batches, metric, method, per_channel, costs, max_drop, progress)
    why: dict[str, str] = {}
    try:
        assignment = _greedy(state, options, why)
        best = _best_meeting(state, layers, precisions)
    except _OutOfEvaluations:
        assignment, best = None, min((e for e in state.evaluations if state.meets(e)), default=None,
                                     key=lambda e: e.objective)
    state.bar.close()
    if best is not None and (assignment is None or state.seen[_key(assignment)].objective > best.objective):
        assignment = best.assignment
        why = {n: f"{p}: from the {best.label or 'best measured'} assignment, cheaper than the search's"
               for n, p in assignment.items()}
    singles = [e for e in state.evaluations if e.label]
    candidates = ([state.seen[_key(assignment)]] if assignment is not None else []) + singles
    if best is None and not (verify and singles):
        raise EdgeqError(f"no assignment of {', '.join(precisions)} keeps the {metric.name} drop within "
                         f"{max_drop} (fp32 {state.fp32_score:.2f}); allow fp32 or a larger --max-drop")
    chosen, verified = _verify(state, candidates, batches, objective) if verify else (candidates[0], None)
    if assignment is None or chosen.assignment != assignment:
        why = {n: f"{p}: the {chosen.label} build, measured cheaper than the search's assignment"
               if assignment is not None else f"{p}: the {chosen.label} build, the cheapest that met the budget"
               for n, p in chosen.assignment.items()}
    qdq = state.quantize(chosen.assignment)
    quantized = QuantizedModel(imported, qdq.model, method, qdq.plan, qdq.ranges, per_channel, "auto")
    result = PolicyResult(quantized, chosen.assignment, why, chosen, state.fp32_score, metric.name, objective,
                          max_drop, state.evaluations, verified, state.sensitivity, min_sqnr)
    quantized.policy = result
    return result


def _key(assignment: dict[str, str]) -> tuple:
    return tuple(sorted(assignment.items()))


def _greedy(state: _Search, layers: list[Layer], why: dict[str, str]) -> dict[str, str] | None:
    """Cheapest first; raise one layer at a time (to any higher precision) by the best measured gain per cost,
    lazily (stale gains are estimates, only the front runner is re-measured); then lower back what the budget
    allows."""
    options = {layer.node: layer.precisions for layer in layers}
    level = {node: 0 for node in options}

    def assign(levels):
        return {node: options[node][i] for node, i in levels.items()}

    def rank(new: Evaluation, old: Evaluation):
        gain, cost = new.score - old.score, max(new.objective - old.objective, 1e-9)
        return (-1, -gain / cost) if gain > 0 else (0, -gain)  # heap order: gains first, by gain per cost

    current = state.evaluate(assign(level))
    why.update({node: f"{p[0]}: its cheapest precision, within the budget" for node, p in options.items()})
    alone = {(node, up): state.evaluate(assign({**level, node: up}))  # each layer raised alone from the start
             for node in options for up in range(1, len(options[node]))}
    sensitivity = {node: [current.score] + [alone[(node, up)].score for up in range(1, len(options[node]))]
                   for node in options}
    state.sensitivity = {node: dict(zip(options[node], scores)) for node, scores in sensitivity.items()}
    heap = [(rank(evaluation, current), node, up) for (node, up), evaluation in alone.items()]
    heapq.heapify(heap)
    while heap and not state.meets(current):
        _, node, up = heapq.heappop(heap)
        if up <= level[node]:
            continue  # already there
        candidate = state.evaluate(assign({**level, node: up}))
        fresh = rank(candidate, current)
        if heap and fresh > heap[0][0]:  # a stale estimate: re-queue with the measured one
            heapq.heappush(heap, (fresh, node, up))
            continue
        before = options[node][level[node]]
        level = {**level, node: up}
        why[node] = (f"{options[node][up]}: raised from {before}, {candidate.score - current.score:+.2f} "
                     f"{state.metric.name} for {candidate.objective - current.objective:+.4g} objective "
                     "(the best measured gain per cost)")
        current = candidate
    if not state.meets(current):
        return None
    while True:  # backtrack: lower a layer (and raise another one step) where the budget still holds
        moves = _cheaper_moves(level, options, state.objective_of_levels(options), state.objective(assign(level)))
        drop = lambda m: current.drop - sum(sensitivity[n][m[n]] - sensitivity[n][level[n]] for n in m)
        moves.sort(key=lambda m: (not state.metric.meets(drop(m), state.max_drop),
                                  state.objective_of_levels(options)(m)))
        for move in moves[:BACKTRACK_TRIES + len(options)]:
            candidate = state.evaluate(assign(move))
            if state.meets(candidate):
                for node in (n for n in level if move[n] != level[n]):
                    why[node] = (f"{options[node][move[node]]}: {'lowered' if move[node] < level[node] else 'raised'}"
                                 f" in backtracking, {candidate.objective - current.objective:+.4g} objective "
                                 f"with the drop at {candidate.drop:.2f}")
                level, current = move, candidate
                break
        else:
            break
    return assign(level)


def _cheaper_moves(level: dict, options: dict, objective, bound: float) -> list[dict]:
    """Assignments one move from ``level`` that cost less than ``bound``: a layer lowered (any number of steps),
    alone or with another layer raised one step (a swap, which a one-layer move cannot reach)."""
    moves = []
    for node in level:
        for down in range(level[node]):
            lowered = {**level, node: down}
            moves.append(lowered)
            moves += [{**lowered, other: level[other] + 1} for other in level
                      if other != node and level[other] + 1 < len(options[other])]
    return [m for m in moves if objective(m) < bound - 1e-12]


def _best_meeting(state: _Search, layers: list[Layer], precisions) -> Evaluation | None:
    """Score the single-mode builds too (int8, fp32; each low-bit mode with first and last layers 8-bit) and return
    the cheapest measured assignment within the budget."""
    edges = {layers[0].node, layers[-1].node}
    widest = {layer.node: max(layer.precisions, key=lambda p: (PRECISIONS[p] <= (8, 8), PRECISIONS[p]))
              for layer in layers}  # int8 where allowed
    for whole in ("int8", "fp32"):  # fp32 too: under ``latency`` a small model may run fastest unquantized
        if whole in precisions and all(whole in layer.precisions for layer in layers):
            state.evaluate({layer.node: whole for layer in layers}, whole)
    for mode in (p for p in precisions if PRECISIONS[p][0] < 8):
        state.evaluate({layer.node: mode if mode in layer.precisions and layer.node not in edges
                        else widest[layer.node] for layer in layers}, mode)
    return min((e for e in state.evaluations if state.meets(e)), default=None, key=lambda e: e.objective)


def _undominated(layer: Layer, cost: dict[str, float]) -> Layer:
    """Drop precisions no cheaper than another with at least as many bits (w2a2 under ``size``: w2a8 costs the
    same bytes); the rest cheapest first."""
    def dominated(p):
        return any(q != p and cost[q] <= cost[p] and all(a >= b for a, b in zip(PRECISIONS[q], PRECISIONS[p]))
                   and (cost[q] < cost[p] or PRECISIONS[q] != PRECISIONS[p]) for q in layer.precisions)

    kept = sorted((p for p in layer.precisions if not dominated(p)), key=lambda p: (cost[p], -sum(PRECISIONS[p])))
    return Layer(layer.node, layer.op_type, layer.weights, tuple(kept))


def _costs(imported, layers: list[Layer], objective: str, latency_options: dict, progress: bool) -> dict:
    """{node: {precision: cost}}: weight bytes, or milliseconds measured on this machine."""
    if objective == "size":
        return {layer.node: {p: layer.weight_bytes(p) for p in PRECISIONS} for layer in layers}
    from .layer_latency import measure

    return measure(imported, layers, PRECISIONS, progress=progress, **latency_options)


def _onnxruntime_first_output(model, batches: list[list[np.ndarray]]) -> np.ndarray:
    """The first output of ``model`` over every batch, run by onnxruntime (the search's fast scorer).

    Only basic graph optimizations: the extended level fuses QDQ into onnxruntime's own int8 kernels, which on an
    x86 CPU without VNNI compute differently from the QDQ arithmetic (AVX2 Zen 1, a MobileNetV2-style digits
    model: 14.8 dB output SQNR fused, 32.6 dB unfused, edgeq's integer kernels 32.6 dB); unfused, DQ -> float op
    -> Q is the grid edgeq computes on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return np.concatenate([np.atleast_1d(session.run(None, dict(zip(names, batch)))[0]) for batch in batches])


def _verify(state: _Search, candidates: list[Evaluation], batches, objective: str) -> tuple[Evaluation, dict]:
    """Build the search's assignment and the single-mode ones, run each with edgeq's integer kernels on the
    evaluation data and measure its objective (the artifact's weight bytes, or its latency here, in interleaved
    rounds); the cheapest that meets the budget wins.  Single modes are built whatever the proxy said of them:
    onnxruntime's QDQ run rounds differently from edgeq's requantization, and on a small evaluation set a point
    of accuracy is a few samples.  Under ``size`` a single mode whose bytes exceed the search's cannot win and is
    not built.  Returns the winner and the measurements."""
    from .compiler import HostBuild

    unique = list({_key(e.assignment): e for e in reversed(candidates)}.values())[::-1]
    if objective == "size":
        unique = [e for e in unique if e is unique[0] or e.objective <= unique[0].objective]
    measured, builds = [], []
    for evaluation in unique:
        built = HostBuild(state.imported, state.quantize(evaluation.assignment).model)
        first = built.outputs[0].name
        score, drop = state.metric.measure(np.concatenate([np.atleast_1d(built.run(b)[first]) for b in batches]))
        builds.append(built)
        measured.append((evaluation, {"label": evaluation.label or "search", "score": score, "drop": drop,
                                      "objective": float(built.weight_bytes)}))
    if objective == "latency":
        for (_, numbers), ms in zip(measured, _interleaved_latency(builds, batches[0])):
            numbers["objective"] = ms
    meeting = [(e, m) for e, m in measured if state.metric.meets(m["drop"], state.max_drop)]
    if not meeting:
        tried = ", ".join(f"{m['label']} drop {m['drop']:.2f}" for _, m in measured)
        raise EdgeqError(f"no measured policy kept the {state.metric.name} drop within {state.max_drop} when built "
                         f"with edgeq's kernels ({tried}) "
                         "though onnxruntime's run of the search's did; allow a larger --max-drop")
    best, numbers = min(meeting, key=lambda pair: pair[1]["objective"])  # min keeps the first (search) on ties
    unit = "ms on this machine" if objective == "latency" else "weight bytes of the artifact"
    return best, {"source": "edgeq build for host (integer kernels)", "unit": unit, **numbers,
                  "compared": [m for _, m in measured]}


def _interleaved_latency(builds: list, batch: list, rounds: int = LATENCY_ROUNDS) -> list[float]:
    """Each build's latency in ms: the median over rounds that time every build once, so that a disturbance
    of the machine falls on all of them alike."""
    times = [[built.latency_ms(batch, repeat=3) for built in builds] for _ in range(rounds)]
    return [float(np.median(column)) for column in zip(*times)]
