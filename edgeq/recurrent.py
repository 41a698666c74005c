"""LSTM, GRU and RNN nodes unrolled over their static sequence into plain ONNX (MatMul, Add, activations).

TVM 0.27's Relax importer has no recurrent ops (Relay's unrolled them the same way), and edgeq compiles
static shapes, so the sequence length is known: each step becomes a handful of nodes the rest of the
pipeline (fusion, quantization, layouts) treats like any other. The input projection X·Wᵀ is one MatMul over
all steps; each step adds H·Rᵀ and applies the cell's equations, exactly as the ONNX operator definitions
state them (gate orders i,o,f,c for LSTM and z,r,h for GRU; biases Wb + Rb; peepholes; clip on the
activations' inputs; layout 1; all three directions).

Per-example sequence_lens (a runtime input, or constants below the sequence length) mask each step: past a
sequence's end its state is kept and its output is zeros, which for the reverse direction also starts each
sequence at its own last element. What cannot be unrolled is refused by node name: activations outside
ACTIVATIONS, a sequence length the shapes leave unknown.
Only opset-7-or-later forms are handled (Reshape takes its shape as an input from opset 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import EdgeqError
from .rewrites import Context


@dataclass(frozen=True)
class Cell:
    """One recurrent op: its gates (in W's row order), activation count and default activations."""

    gates: int
    default_activations: tuple[str, ...]
    step: object  # (Step, node, its activations, Direction, x·Wᵀ + Wb at t, h, c) -> (h, c) at t


# activation name -> (ONNX op, attributes it takes from activation_alpha / activation_beta, in that order)
ACTIVATIONS = {
    "Sigmoid": ("Sigmoid", ()),
    "Tanh": ("Tanh", ()),
    "Relu": ("Relu", ()),
    "HardSigmoid": ("HardSigmoid", ("alpha", "beta")),
    "LeakyRelu": ("LeakyRelu", ("alpha",)),
    "Elu": ("Elu", ("alpha",)),
    "ThresholdedRelu": ("ThresholdedRelu", ("alpha",)),
    "Softsign": ("Softsign", ()),
    "Softplus": ("Softplus", ()),
}


class Step:
    """Emits the nodes of one node's unrolling, all named under the node's name."""

    def __init__(self, ctx: Context, base: str, dtype: np.dtype, batch: int, hidden: int, clip: float | None):
        self.ctx, self.base, self.dtype, self.batch, self.hidden, self.clip = ctx, base, dtype, batch, hidden, clip
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op: str, inputs: list[str], label: str, out: str | None = None, **attrs) -> str:
        out = out or self.ctx.fresh(f"{self.base}/{label}")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.ctx.fresh(f"{self.base}/{label}_op"), **attrs))
        return out

    def const(self, label: str, value) -> str:
        return self.ctx.constant(f"{self.base}/{label}", np.asarray(value))

    def index(self, value: str, i: int, axis: int, label: str) -> str:
        return self.op("Gather", [value, self.const(f"{label}_index", np.array(i, np.int64))], label, axis=axis)

    def reshape(self, value: str, shape: list[int], label: str) -> str:
        return self.op("Reshape", [value, self.const(f"{label}_shape", np.array(shape, np.int64))], label)

    def gates(self, value: str, count: int, label: str) -> list[str]:
        """[B, count*H] -> count tensors [B, H]."""
        grouped = self.reshape(value, [self.batch, count, self.hidden], f"{label}_grouped")
        return [self.index(grouped, g, 1, f"{label}{g}") for g in range(count)]

    def activate(self, activation: tuple[str, dict], value: str, label: str, clip: bool = True) -> str:
        if clip and self.clip is not None:
            if self.ctx.opset >= 11:
                bounds = [self.const("clip_low", np.array(-self.clip, self.dtype)),
                          self.const("clip_high", np.array(self.clip, self.dtype))]
                value = self.op("Clip", [value, *bounds], f"{label}_clipped")
            else:
                value = self.op("Clip", [value], f"{label}_clipped", min=-self.clip, max=self.clip)
        op, attrs = activation
        return self.op(op, [value], label, **attrs)

    def add(self, *values: str, label: str) -> str:
        total = values[0]
        for v in values[1:]:
            total = self.op("Add", [total, v], label)
        return total


@dataclass
class Direction:
    """One direction's recurrent weights, as the step needs them."""

    r_t: str  # Rᵀ [H, gates*H]
    rb: str  # Rb [gates*H]
    peepholes: list[str] | None = None  # LSTM P split into i, o, f
    r_h_t: str | None = None  # GRU: the h gate's Rᵀ [H, H] (reset applied before the product)
    rb_h: str | None = None


def _lstm_step(s: Step, node, acts, w: Direction, xw, h, c):
    f, g, act_h = acts
    pre = s.gates(s.add(xw, s.op("MatMul", [h, w.r_t], "hr"), w.rb, label="gates"), 4, "gate")  # i, o, f, c

    def peep(value, k, cell):
        return s.add(value, s.op("Mul", [w.peepholes[k], cell], "peephole"), label="peeped") if w.peepholes else value

    i = s.activate(f, peep(pre[0], 0, c), "i")
    forget = (s.op("Sub", [s.const("one", np.array(1, s.dtype)), i], "f") if _attr(node, "input_forget", 0)
              else s.activate(f, peep(pre[2], 2, c), "f"))
    candidate = s.activate(g, pre[3], "c_candidate")
    c_new = s.add(s.op("Mul", [forget, c], "c_kept"), s.op("Mul", [i, candidate], "c_added"), label="c")
    o = s.activate(f, peep(pre[1], 1, c_new), "o")
    return s.op("Mul", [o, s.activate(act_h, c_new, "c_activated", clip=False)], "h"), c_new


def _gru_step(s: Step, node, acts, w: Direction, xw, h, c):
    f, g = acts
    x_z, x_r, x_h = s.gates(xw, 3, "x_gate")
    h_z, h_r, h_h = s.gates(s.add(s.op("MatMul", [h, w.r_t], "hr"), w.rb, label="h_gates"), 3, "h_gate")
    z = s.activate(f, s.add(x_z, h_z, label="z_in"), "z")
    r = s.activate(f, s.add(x_r, h_r, label="r_in"), "r")
    if _attr(node, "linear_before_reset", 0):
        recurrent = s.op("Mul", [r, h_h], "reset_h")
    else:
        reset = s.op("Mul", [r, h], "reset_h")
        recurrent = s.add(s.op("MatMul", [reset, w.r_h_t], "reset_hr"), w.rb_h, label="reset_hr_b")
    candidate = s.activate(g, s.add(x_h, recurrent, label="h_in"), "h_candidate")
    # (1 - z) * candidate + z * h
    h_new = s.add(candidate, s.op("Mul", [z, s.op("Sub", [h, candidate], "h_delta")], "h_kept"), label="h")
    return h_new, c


def _rnn_step(s: Step, node, acts, w: Direction, xw, h, c):
    return s.activate(acts[0], s.add(xw, s.op("MatMul", [h, w.r_t], "hr"), w.rb, label="h_in"), "h"), c


CELLS = {
    "LSTM": Cell(4, ("Sigmoid", "Tanh", "Tanh"), _lstm_step),
    "GRU": Cell(3, ("Sigmoid", "Tanh"), _gru_step),
    "RNN": Cell(1, ("Tanh",), _rnn_step),
}


def _attr(node, name, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _activations(node, cell: Cell, directions: int) -> list[list[tuple[str, dict]]]:
    """Per direction, the (op, attrs) of each activation; alpha/beta consumed in order by those that take them."""
    names = [n.decode() if isinstance(n, bytes) else n for n in _attr(node, "activations", [])] \
        or list(cell.default_activations) * directions
    per_direction = len(cell.default_activations)
    if len(names) == per_direction and directions == 2:
        names = names * 2
    if len(names) != per_direction * directions:
        raise EdgeqError(f"{node.op_type} node {node.name!r} lists {len(names)} activations; "
                         f"{per_direction * directions} expected")
    alphas, betas = list(_attr(node, "activation_alpha", [])), list(_attr(node, "activation_beta", []))
    resolved = []
    for name in names:
        key = next((k for k in ACTIVATIONS if k.lower() == name.lower()), None)
        if key is None:
            raise EdgeqError(f"{node.op_type} node {node.name!r} uses activation {name!r}; edgeq unrolls "
                             f"{', '.join(ACTIVATIONS)}")
        op, takes = ACTIVATIONS[key]
        attrs = {}
        for attr_name, pool in zip(takes, (alphas, betas)):
            if pool:
                attrs[attr_name] = float(pool.pop(0))
        resolved.append((op, attrs))
    return [resolved[d * per_direction:(d + 1) * per_direction] for d in range(directions)]


def _input(node, i: int) -> str:
    return node.input[i] if len(node.input) > i and node.input[i] else ""


def _unroll(ctx: Context, node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> list[onnx.NodeProto]:
    cell, name = CELLS[node.op_type], node.name or next(o for o in node.output if o)
    x = node.input[0]
    if x not in shapes:
        raise EdgeqError(f"{node.op_type} node {name!r}: the shape of its input {x!r} is not static; edgeq unrolls "
                         "recurrent ops over a fixed sequence length (fix the input shapes with --input-shape)")
    layout = _attr(node, "layout", 0)
    steps, batch, _ = shapes[x] if layout == 0 else (shapes[x][1], shapes[x][0], shapes[x][2])
    direction = _attr(node, "direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    directions = 2 if direction == "bidirectional" else 1
    hidden = _attr(node, "hidden_size") or shapes.get(node.input[2], (0, 0, 0))[2]
    lengths = _input(node, 4)
    if lengths in ctx.constants and (numpy_helper.to_array(ctx.constants[lengths]) == steps).all():
        lengths = ""  # every sequence full length: no masks
    dtype = helper.tensor_dtype_to_np_dtype(ctx.types[x])
    acts = _activations(node, cell, directions)
    clip = _attr(node, "clip")
    s = Step(ctx, name, dtype, batch, hidden, clip)
    if layout:
        x = s.op("Transpose", [x], "x_time_major", perm=[1, 0, 2])

    def state(i: int, d: int, label: str) -> str:
        given = _input(node, i)
        if not given:
            return s.const(label, np.zeros((batch, hidden), dtype))
        return s.index(given, d, 1 if layout else 0, label)

    outputs, finals_h, finals_c = [], [], []
    zeros = s.const("zeros", np.zeros((batch, hidden), dtype)) if lengths else None
    for d in range(directions):
        w_t = s.op("Transpose", [s.index(node.input[1], d, 0, f"w{d}")], f"w{d}_t")
        r = s.index(node.input[2], d, 0, f"r{d}")
        if _input(node, 3):
            biases = s.reshape(s.index(node.input[3], d, 0, f"b{d}"), [2, cell.gates * hidden], f"b{d}_pair")
            wb, rb = s.index(biases, 0, 0, f"wb{d}"), s.index(biases, 1, 0, f"rb{d}")
        else:
            wb = rb = s.const(f"b{d}_zero", np.zeros(cell.gates * hidden, dtype))
        weights = Direction(s.op("Transpose", [r], f"r{d}_t"), rb)
        if node.op_type == "LSTM" and _input(node, 7):
            p = s.reshape(s.index(node.input[7], d, 0, f"p{d}"), [3, hidden], f"p{d}_grouped")
            weights.peepholes = [s.index(p, k, 0, f"p{d}_{k}") for k in range(3)]
        if node.op_type == "GRU":
            r_h = s.index(s.reshape(r, [3, hidden, hidden], f"r{d}_grouped"), 2, 0, f"r{d}_h")
            weights.r_h_t = s.op("Transpose", [r_h], f"r{d}_h_t")
            weights.rb_h = s.index(s.reshape(rb, [3, hidden], f"rb{d}_grouped"), 2, 0, f"rb{d}_h")
        xw = s.add(s.op("MatMul", [x, w_t], f"xw{d}"), wb, label=f"xw{d}_b")
        h = state(5, d, f"h{d}_initial")
        c = state(6, d, f"c{d}_initial") if node.op_type == "LSTM" else None
        per_step = [None] * steps
        backwards = direction == "reverse" or d == 1
        for t in (range(steps - 1, -1, -1) if backwards else range(steps)):
            h_new, c_new = cell.step(s, node, acts[d], weights, s.index(xw, t, 0, f"xw{d}_t{t}"), h, c)
            y = h_new
            if lengths:  # steps past a sequence's end keep its state and output zeros
                valid = s.reshape(s.op("Less", [s.const(f"t{t}", np.array(t, np.int32)), lengths], f"valid{t}"),
                                  [batch, 1], f"valid{t}_column")
                h_new = s.op("Where", [valid, h_new, h], f"h{d}_t{t}_kept")
                c_new = s.op("Where", [valid, c_new, c], f"c{d}_t{t}_kept") if c is not None else None
                y = s.op("Where", [valid, y, zeros], f"y{d}_t{t}_masked")
            h, c = h_new, c_new
            per_step[t] = s.reshape(y, [1, 1, batch, hidden], f"y{d}_t{t}")
        if lengths:  # an empty sequence's final state is zeros, not the initial state (as ONNX Runtime)
            started = s.reshape(s.op("Greater", [lengths, s.const("zero_length", np.array(0, np.int32))], "started"),
                                [batch, 1], "started_column")
            h = s.op("Where", [started, h, zeros], f"h{d}_started")
            c = s.op("Where", [started, c, zeros], f"c{d}_started") if c is not None else None
        outputs.append(s.op("Concat", per_step, f"y{d}", axis=0) if steps > 1 else per_step[0])
        finals_h.append(s.reshape(h, [1, batch, hidden], f"h{d}_final"))
        if c is not None:
            finals_c.append(s.reshape(c, [1, batch, hidden], f"c{d}_final"))

    def emit(i: int, parts: list[str], perm: list[int], label: str):
        if len(node.output) <= i or not node.output[i]:
            return
        joined = s.op("Concat", parts, label, axis=1 if i == 0 else 0) if len(parts) > 1 else parts[0]
        if layout:
            s.op("Transpose", [joined], label, out=node.output[i], perm=perm)
        else:
            s.op("Identity", [joined], label, out=node.output[i])

    emit(0, outputs, [2, 0, 1, 3], "y")
    emit(1, finals_h, [1, 0, 2], "y_h")
    if node.op_type == "LSTM":
        emit(2, finals_c, [1, 0, 2], "y_c")
    return s.nodes


def _static_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    for v in (*graph.input, *graph.value_info, *graph.output):
        dims = v.type.tensor_type.shape.dim
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape") and \
                all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = tuple(d.dim_value for d in dims)
    return shapes


def _dequantized_lstm(ctx: Context, node: onnx.NodeProto, shapes: dict) -> onnx.NodeProto:
    """ONNX Runtime's com.microsoft.DynamicQuantizeLSTM (what quantize_dynamic makes of an LSTM) as the LSTM it
    came from: W [D, I, 4H] and R [D, H, 4H] int8 with per-direction or per-gate-row scales and zero points,
    dequantized and transposed back to [D, 4H, I] / [D, 4H, H]. The recurrence then runs in float, as
    ONNX Runtime's own kernel does for everything but its two matrix products (which it quantizes per call)."""
    name = node.name or next(o for o in node.output if o)
    weights = []
    for q, scale, zero in ((1, 8, 9), (2, 10, 11)):
        names = [node.input[q], node.input[scale], _input(node, zero)]
        missing = [n for n in names if n and n not in ctx.constants]
        if missing:
            raise EdgeqError(f"DynamicQuantizeLSTM node {name!r}: {missing[0]!r} is not a constant; edgeq dequantizes "
                             "the weights at compile time")
        w, s = (numpy_helper.to_array(ctx.constants[n]) for n in names[:2])
        z = numpy_helper.to_array(ctx.constants[names[2]]) if names[2] else np.zeros_like(s, w.dtype)
        s, z = (v.reshape(v.shape[0], 1, -1) for v in (s.astype(np.float32), z.astype(np.float32)))  # [D, 1, 1|4H]
        dequantized = ((w.astype(np.float32) - z) * s).transpose(0, 2, 1)
        weights.append(ctx.constant(f"{name}/{'WR'[q - 1]}_dequantized", dequantized))
    rest = [node.input[i] if len(node.input) > i else "" for i in range(3, 8)]
    while rest and not rest[-1]:
        rest.pop()
    return helper.make_node("LSTM", [node.input[0], *weights, *rest], list(node.output), name=name,
                            **{a.name: helper.get_attribute_value(a) for a in node.attribute})


# the recurrent ops of other domains: (domain, op) -> the standard node they stand for
STANDARD_FORMS = {("com.microsoft", "DynamicQuantizeLSTM"): _dequantized_lstm}


def _recurrent(node: onnx.NodeProto) -> bool:
    return (node.op_type in CELLS and node.domain in ("", "ai.onnx")) or (node.domain, node.op_type) in STANDARD_FORMS


def has_recurrent(proto: onnx.ModelProto) -> bool:
    return any(_recurrent(n) for n in proto.graph.node)


def unroll_recurrent(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model (changed in place) with every top-level LSTM / GRU / RNN node (and STANDARD_FORMS) unrolled."""
    graph = proto.graph
    if not has_recurrent(proto):
        return proto
    ctx = Context(proto)
    shapes = _static_shapes(graph)
    nodes = []
    for node in graph.node:
        if (node.domain, node.op_type) in STANDARD_FORMS:
            node = STANDARD_FORMS[node.domain, node.op_type](ctx, node, shapes)
        nodes.extend(_unroll(ctx, node, shapes) if _recurrent(node) else [node])
    graph.ClearField("node")
    graph.node.extend(nodes)
    return proto
