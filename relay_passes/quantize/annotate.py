"""Annotate: choose the tensors to quantize from a table of op types, and write the choice as a QDQ ONNX graph.

The output is the standard QuantizeLinear/DequantizeLinear ("QDQ") format that ONNX Runtime and PyTorch write, so
edgeq's own quantization and a model quantized elsewhere take the same road from here on (realize.py).  Weights
become int8 initializers (symmetric, per output channel by default) behind a DequantizeLinear; activations get a
QuantizeLinear -> DequantizeLinear pair with per-tensor asymmetric parameters from calibration.  An activation
(Relu, Clip) that is the only consumer of a conv/matmul/add is fused: the pair goes after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from schedules import scheme


@dataclass(frozen=True)
class OpRule:
    """How an op type is quantized: which inputs are activations, which is the weight and its channel axis."""

    activations: tuple[int, ...] | None  # None: every input
    weight: int | None = None
    fuses_activation: bool = False


# axis of the output channel in the weight is decided in _weight_axis (Gemm's depends on transB)
OP_RULES = {
    "Conv": OpRule((0,), weight=1, fuses_activation=True),
    "MatMul": OpRule((0,), weight=1, fuses_activation=True),
    "Gemm": OpRule((0,), weight=1, fuses_activation=True),
    "Add": OpRule((0, 1), fuses_activation=True),
    "Mul": OpRule((0, 1)),
    "Concat": OpRule(None),
    "Split": OpRule((0,)),
    "MaxPool": OpRule((0,)),
    "AveragePool": OpRule((0,)),
    "GlobalAveragePool": OpRule((0,)),
    "Relu": OpRule((0,)),
    "Clip": OpRule((0,)),
}
ACTIVATIONS = ("Relu", "Clip")
WEIGHTED = ("Conv", "MatMul", "Gemm")
# Ops that only move or select values: quantized when they read a quantized tensor (so chains stay integer),
# never after a float op (that would only add a quantize/dequantize round trip around a float value).
FOLLOWERS = ("Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Split")


@dataclass
class Policy:
    """What to quantize: `exclude` holds node names, op types, or "first"/"last" (the first/last weighted op).

    Low-bit modes (Choi et al.): ``weight_bits`` < 8 quantizes the weights of conv (groups 1) / matmul / gemm
    with SAWB (odd integers 2c - (2^b - 1) times alpha / (2^b - 1), per channel), ``activation_bits`` < 8 the
    non-negative (ReLU/Clip) inputs of those layers with PACT (codes 0..2^k-1, scale alpha / (2^k - 1)).
    ``keep_8bit`` (node names, op types, "first", "last") stay 8-bit.  ``fpsc`` keeps residual shortcuts at 8 bits
    (the paper's "full-precision shortcut" variant): the convs on the shortcut side of a residual Add keep 8-bit
    weights, and the tensors from the fork through the Add's output stay 8-bit activations, not PACT codes.
    ``layer_bits`` (node name -> (weight bits, activation bits)) sets a layer's widths one by one, over the
    global ones and ``keep_8bit`` (a per-layer policy, edgeq.policy); (8, 8) is int8.
    """

    activation_dtype: str = "uint8"
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    weight_bits: int = 8
    activation_bits: int = 8
    keep_8bit: tuple[str, ...] = ("first", "last")
    fpsc: bool = False
    layer_bits: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class Group:
    """One quantized op, possibly with its fused activation: the unit the realize pass turns into a kernel."""

    node: str  # name of the anchor node
    op_type: str
    inputs: list[str]  # activation tensors read (quantized)
    output: str  # tensor written (after the fused activation)
    activation: str | None = None  # name of the fused Relu/Clip node
    weight: str | None = None
    weight_axis: int | None = None
    weight_bits: int = 8  # < 8: SAWB low-bit weights


@dataclass
class Plan:
    groups: list[Group] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> why it stays float
    # PACT tensors: name -> (bits, tensor whose calibrated alpha it uses: itself, or a max pool's input)
    low_bit: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def tensors(self) -> list[str]:
        """Every activation tensor that gets calibrated and quantized, in graph order."""
        seen: dict[str, None] = {}
        for g in self.groups:
            for name in (*g.inputs, g.output):
                seen.setdefault(name)
        return list(seen)


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a unique name (policies and reports refer to nodes by name)."""
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    return model


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and _attr(node, "value") is not None:
            values[node.output[0]] = numpy_helper.to_array(_attr(node, "value"))
    return values


def _why_not(node, consts: dict[str, np.ndarray], shapes: dict[str, list[int]]) -> str | None:
    """Why an op of a known type can't be quantized here (None when it can)."""
    rule = OP_RULES[node.op_type]
    if rule.weight is not None:
        if node.op_type == "MatMul" and node.input[1] not in consts:
            return "both operands are activations (attention); only matmul by a constant is quantized"
        if len(node.input) <= rule.weight or node.input[rule.weight] not in consts:
            return "weight is not a constant"
        if len(node.input) > 2 and node.input[2] and node.input[2] not in consts:
            return "bias is not a constant"
    if node.op_type == "MatMul" and (consts[node.input[1]].ndim != 2 or len(shapes.get(node.input[0], [])) < 2):
        return "only matmul by a 2-D constant is quantized"
    if node.op_type == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0
                                   or _attr(node, "beta", 1.0) != 1.0):
        return "Gemm with transA/alpha/beta"
    if node.op_type == "Conv" and len(shapes.get(node.input[0], [])) != 4:
        return "only 2-D convolutions are quantized"
    if node.op_type in ("Add", "Mul") and any(i in consts for i in node.input):
        return f"{node.op_type} of a constant stays float"
    if node.op_type in ("MaxPool", "AveragePool") and len(shapes.get(node.input[0], [])) != 4:
        return "only 2-D pooling is quantized"
    if node.op_type == "Clip" and any(i and i not in consts for i in node.input[1:]):
        return "Clip bounds are not constants"
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        return "MaxPool with indices"
    if node.op_type == "Split" and len(node.input) > 1 and node.input[1] and node.input[1] not in consts:
        return "Split sizes are not constants"
    return None


def _gated_activation(node, producers: dict) -> bool:
    """x * sigmoid(x) (SiLU / Swish) and x * hard_sigmoid(x) (hard-swish) are one activation of x: realize
    turns the whole float island into a table of x's codes, which a quantized Mul would split in two."""
    if node.op_type != "Mul" or len(node.input) != 2:
        return False
    return any(producers.get(gate) is not None and producers[gate].op_type in ("Sigmoid", "HardSigmoid")
               and producers[gate].input[0] == other for gate, other in (node.input, node.input[::-1]))


def _weight_axis(node) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    return 1  # MatMul: [K, N], output channels on axis 1


# Followers that commute with quantization (a max, a copy): when one reads a float tensor but its output is
# quantized anyway (a conv reads it), quantizing its input instead turns the op itself integer at no extra
# round trip. YOLOv8's SPPF: SiLU -> three 5x5 max pools -> concat -> conv ran its pools and concat in float;
# its C2f blocks: SiLU -> Split -> convs and a concat.
_HOISTED = ("MaxPool", "Concat", "Split")
_FLOAT_INPUT = "its input is not quantized"  # why a follower is skipped, and what makes it a hoisting candidate


def plan(model: onnx.ModelProto, policy: Policy) -> Plan:
    """Which nodes are quantized (as groups) and which stay float, for a shape-inferred, named model."""
    hoisted: set[str] = set()
    while True:
        result = _plan(model, policy, hoisted)
        tensors = set(result.tensors)
        more = {node for node, reason in result.skipped.items() if reason == _FLOAT_INPUT} & {
            n.name for n in model.graph.node if n.op_type in _HOISTED and tensors & set(n.output)}
        if not more:
            return result
        hoisted |= more


def _plan(model: onnx.ModelProto, policy: Policy, hoisted: set[str]) -> Plan:
    """One planning pass; the ``hoisted`` followers are quantized even on float inputs."""
    graph = model.graph
    consts = _constants(graph)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*graph.input, *graph.value_info, *graph.output)}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    producers = {out: node for node in graph.node for out in node.output}
    weighted = [n.name for n in graph.node if n.op_type in WEIGHTED]
    excluded = set(policy.exclude)
    if "first" in excluded and weighted:
        excluded.add(weighted[0])
    if "last" in excluded and weighted:
        excluded.add(weighted[-1])
    result, fused = Plan(), set()
    quantized = {i.name for i in graph.input}  # the model's inputs are quantized at the edge when read
    quantized |= {name for node in graph.node if node.name in hoisted for name in node.input}
    for node in graph.node:
        if node.name in fused or node.op_type not in OP_RULES:
            continue
        if node.name in excluded or node.op_type in excluded:
            result.skipped[node.name] = "excluded by policy"
            continue
        if _gated_activation(node, producers):
            continue  # not a layer of its own: part of an activation realized as a table
        reason = _why_not(node, consts, shapes)
        if not reason and node.op_type in FOLLOWERS and not quantized & set(node.input):
            reason = _FLOAT_INPUT
        if reason:
            result.skipped[node.name] = reason
            continue
        rule = OP_RULES[node.op_type]
        picks = range(len(node.input)) if rule.activations is None else rule.activations
        group = Group(node.name, node.op_type, [node.input[i] for i in picks if node.input[i]], node.output[0])
        if rule.weight is not None:
            group.weight, group.weight_axis = node.input[rule.weight], _weight_axis(node)
        users = consumers.get(node.output[0], [])
        if (rule.fuses_activation and len(users) == 1 and users[0].op_type in ACTIVATIONS
                and node.output[0] not in graph_outputs and users[0].name not in excluded
                and _why_not(users[0], consts, shapes) is None):
            group.activation, group.output = users[0].name, users[0].output[0]
            fused.add(users[0].name)
        result.groups.append(group)
        quantized.add(group.output)
        if node.op_type == "Split":  # every part is a slice of the quantized input
            quantized.update(o for o in node.output if o)
    if policy.weight_bits < 8 or policy.activation_bits < 8 or policy.layer_bits:
        _assign_low_bits(result, policy, graph, consts)
    return result


def _assign_low_bits(plan_: Plan, policy: Policy, graph: onnx.GraphProto, consts: dict) -> None:
    """Mark the low-bit weighted groups and the PACT activation tensors they read."""
    nodes = {n.name: n for n in graph.node}
    weighted = [g for g in plan_.groups if g.weight is not None]
    keep = set(policy.keep_8bit)
    if "first" in keep and weighted:
        keep.add(weighted[0].node)
    if "last" in keep and weighted:
        keep.add(weighted[-1].node)
    eight_bit: set[str] = set()  # activation tensors that stay 8-bit
    if policy.fpsc:
        adds, shortcut_layers, eight_bit = _residual_shortcuts(graph, consts)
        keep |= shortcut_layers
        eight_bit |= {g.output for g in plan_.groups if g.node in adds}  # after a fused ReLU
    producers = {g.output: g for g in plan_.groups}
    for group in weighted:
        if group.node in policy.layer_bits:
            weight_bits, activation_bits = policy.layer_bits[group.node]
        elif group.node in keep or group.op_type in keep:
            continue
        else:
            weight_bits, activation_bits = policy.weight_bits, policy.activation_bits
        if not low_bit_capable(group, nodes):
            continue
        group.weight_bits = min(weight_bits, 8)
        if activation_bits < 8:
            _mark_pact_input(plan_, producers, group.inputs[0], activation_bits, eight_bit)


def low_bit_capable(group: Group, nodes: dict) -> bool:
    """Whether a weighted group can take low-bit weights: grouped / depthwise convolutions stay 8-bit."""
    return not (group.op_type == "Conv" and _attr(nodes[group.node], "group", 1) != 1)


def _mark_pact_input(plan_: Plan, producers: dict, tensor: str, bits: int, eight_bit: set[str]) -> None:
    """A low-bit layer's input is a PACT tensor when it is a fused ReLU/Clip output, possibly behind max pools
    (which keep its codes and its alpha); otherwise, or when one of them must stay 8-bit, it stays 8-bit."""
    chain = []
    producer = producers.get(tensor)
    while producer is not None and producer.op_type == "MaxPool":
        chain.append(producer.output)
        producer = producers.get(producer.inputs[0])
    if producer is None or producer.activation is None or eight_bit & {producer.output, *chain}:
        return
    for name in (producer.output, *chain):
        old = plan_.low_bit.get(name)
        plan_.low_bit[name] = (max(bits, old[0]) if old else bits, producer.output)


def _residual_shortcuts(graph: onnx.GraphProto, consts: dict) -> tuple[set[str], set[str], set[str]]:
    """fpsc: the shortcut side of every residual Add (two computed inputs that fork from one tensor), the input
    with fewer weighted layers back to the fork (ResNet: the identity, or the 1x1 downsample conv; a tie has no
    shortcut).  Returns (the residual Adds, the weighted nodes on shortcuts, the tensors from each fork through
    the shortcut into and out of its Add)."""
    producer = {out: node for node in graph.node for out in node.output}
    order = {out: i for i, node in enumerate(graph.node) for out in node.output}

    def upstream(tensor: str) -> set[str]:
        seen, todo = set(), [tensor]
        while todo:
            name = todo.pop()
            if name and name not in seen and name not in consts:
                seen.add(name)
                todo.extend(producer[name].input if name in producer else ())
        return seen

    adds, layers, tensors = set(), set(), set()
    for add in graph.node:
        if add.op_type != "Add" or len(add.input) != 2 or any(i in consts for i in add.input):
            continue
        a, b = (upstream(i) for i in add.input)
        common = a & b
        if not common:
            continue  # two independent inputs: no fork
        fork = max(common, key=lambda t: order.get(t, -1))  # the last tensor both depend on
        branches = [a - common, b - common]
        weighted = [{producer[t].name for t in branch if t in producer and producer[t].op_type in WEIGHTED}
                    for branch in branches]
        if len(weighted[0]) == len(weighted[1]):
            continue
        shortcut = 0 if len(weighted[0]) < len(weighted[1]) else 1
        adds.add(add.name)
        layers |= weighted[shortcut]
        tensors |= {fork, *branches[shortcut], *add.input, *add.output}
    return adds, layers, tensors


def insert_qdq(model: onnx.ModelProto, plan_: Plan, ranges: dict[str, tuple[float, float]],
               policy: Policy) -> onnx.ModelProto:
    """The QDQ model: Q/DQ pairs on the planned activations with the calibrated ranges, int8 weights behind DQ."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    consts = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    new_inits, new_nodes = [], {}  # new_nodes: producer tensor name -> nodes to insert after it
    rename: dict[str, str] = {}
    graph_outputs = {o.name for o in graph.output}
    activation_qparams: dict[str, scheme.QParams] = {}  # the weights' bias fit reads their input's scale
    for tensor in plan_.tensors:
        if tensor in plan_.low_bit:
            bits, source = plan_.low_bit[tensor]
            qp = _pact_qparams(ranges[source][1], bits, policy.activation_dtype)
        else:
            qp = scheme.activation_qparams(*ranges[tensor], policy.activation_dtype)
        activation_qparams[tensor] = qp
        scale, zero = f"{tensor}.scale", f"{tensor}.zero_point"
        new_inits += [numpy_helper.from_array(np.asarray(qp.scale, np.float32), scale),
                      numpy_helper.from_array(np.asarray(qp.zero_point, policy.activation_dtype), zero)]
        source = f"{tensor}.float" if tensor in graph_outputs else tensor
        dq_out = tensor if tensor in graph_outputs else f"{tensor}.dq"
        rename[tensor] = source if tensor in graph_outputs else dq_out
        new_nodes[tensor] = [
            helper.make_node("QuantizeLinear", [source, scale, zero], [f"{tensor}.q"], name=f"{tensor}.quantize"),
            helper.make_node("DequantizeLinear", [f"{tensor}.q", scale, zero], [dq_out], name=f"{tensor}.dequantize"),
        ]
    for group in plan_.groups:
        if group.weight is None:
            continue
        node = nodes[group.node]
        weight = numpy_helper.to_array(consts[group.weight]).astype(np.float32)
        axis = group.weight_axis if policy.per_channel else None
        if group.weight_bits < 8:
            values, scale = _sawb_weight(weight, group.weight_bits, axis)
        else:
            qp = scheme.weight_qparams(weight, axis)
            if len(node.input) > 2 and node.input[2] in consts:  # Conv / Gemm bias, folded into the accumulator
                input_scale = float(activation_qparams[node.input[0]].scale)
                qp = scheme.fit_bias(qp, numpy_helper.to_array(consts[node.input[2]]), input_scale)
            values, scale = scheme.quantize_weight(weight, qp), qp.scale
        base = f"{group.node}.weight"
        new_inits += [numpy_helper.from_array(values, f"{base}.q"),
                      numpy_helper.from_array(scale, f"{base}.scale"),
                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{base}.zero_point")]
        axis = {"axis": group.weight_axis} if policy.per_channel else {}
        dq = helper.make_node("DequantizeLinear", [f"{base}.q", f"{base}.scale", f"{base}.zero_point"],
                              [f"{base}.dq"], name=f"{base}.dequantize", **axis)
        new_nodes.setdefault("", []).append(dq)
        node.input[OP_RULES[node.op_type].weight] = f"{base}.dq"
    _pact_clips(graph, nodes, plan_, ranges, new_inits)
    # Rewire: graph outputs are produced under a new name and dequantized back to theirs; every other consumer
    # of a quantized tensor reads its dequantized copy.
    quantized = set(plan_.tensors)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in quantized and name not in graph_outputs:
                node.input[i] = rename[name]
        for i, name in enumerate(node.output):
            if name in quantized and name in graph_outputs:
                node.output[i] = rename[name]
    ordered = list(new_nodes.get("", []))
    for tensor in (i.name for i in graph.input):
        ordered += new_nodes.get(tensor, [])
    renamed_outputs = {rename[t]: t for t in quantized & graph_outputs}
    for node in graph.node:
        ordered.append(node)
        for out in node.output:
            ordered += new_nodes.get(renamed_outputs.get(out, out), [])
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(new_inits)
    used = {name for node in graph.node for name in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return model


def _pact_qparams(alpha: float, bits: int, dtype: str) -> scheme.QParams:
    """PACT activation: codes 0..2^k-1 (zero point 0), scale alpha / (2^k - 1)."""
    scale = np.float32(max(float(alpha), 0.0) / (2**bits - 1))
    if not np.isfinite(scale) or scale <= 0.0:
        scale = np.float32(1.0)
    return scheme.QParams(np.asarray(scale, np.float32), np.asarray(0, np.int32), dtype)


def _sawb_weight(weight: np.ndarray, bits: int, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """SAWB int8 integers 2c - (2^b - 1) and their per-channel scale alpha / (2^b - 1) (float32)."""
    from . import sawb

    quantized = sawb.quantize_weights(weight, bits, axis)
    return quantized.integers().astype(np.int8), np.asarray(quantized.scale, np.float32)


def _pact_clips(graph, nodes: dict, plan_: Plan, ranges, new_inits: list) -> None:
    """PACT replaces the fused ReLU/Clip of a group writing a PACT tensor by Clip(0, alpha)."""
    for group in plan_.groups:
        if group.activation is None or group.output not in plan_.low_bit or plan_.low_bit[group.output][1] != group.output:
            continue
        bits, _ = plan_.low_bit[group.output]
        qp = _pact_qparams(ranges[group.output][1], bits, "uint8")
        alpha = float(qp.scale) * (2**bits - 1)
        node = nodes[group.activation]
        lo, hi = f"{group.output}.pact_lo", f"{group.output}.pact_alpha"
        new_inits += [numpy_helper.from_array(np.asarray(0.0, np.float32), lo),
                      numpy_helper.from_array(np.asarray(alpha, np.float32), hi)]
        source = node.input[0]
        del node.input[:]
        node.input.extend([source, lo, hi])
        del node.attribute[:]
        node.op_type = "Clip"


def upgrade_opset(model: onnx.ModelProto, version: int = 13) -> onnx.ModelProto:
    """Convert an older model to opset 13, the first with per-axis QuantizeLinear/DequantizeLinear."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if current >= version:
        return model
    from onnx import version_converter

    return version_converter.convert_version(model, version)
