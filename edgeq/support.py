"""What edgeq refuses before import, each with its reason: non-tensor values, element types TVM cannot compute,
and op forms TVM 0.27 imports wrongly or cannot lower.

Every rule was found by the ONNX conformance run (benchmarks/conformance.py): without it the model would end in
an internal error deep in TVM or, worse, compile and give wrong outputs. A rule names the op, the node and the
attribute or input it is about. Rules are data: (op type, predicate on the node, reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx
from onnx import TensorProto, helper

# Element types TVM 0.27's CPU code cannot compute (no LLVM lowering for their arithmetic or casts).
UNSUPPORTED_ELEM_TYPES = {
    TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2,
    TensorProto.FLOAT8E5M2FNUZ, TensorProto.FLOAT4E2M1, TensorProto.INT4, TensorProto.UINT4,
    TensorProto.COMPLEX64, TensorProto.COMPLEX128, TensorProto.STRING,
    *(getattr(TensorProto, name) for name in ("FLOAT8E8M0", "INT2", "UINT2") if hasattr(TensorProto, name)),
}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def tensor_types(graph: onnx.GraphProto) -> tuple[dict[str, int], dict[str, int]]:
    """({tensor: ONNX element type}, {tensor: rank}) of the graph's typed values and initializers."""
    elem, ranks = {}, {}
    for v in (*graph.input, *graph.value_info, *graph.output):
        if v.type.HasField("tensor_type"):
            elem[v.name] = v.type.tensor_type.elem_type
            if v.type.tensor_type.HasField("shape"):
                ranks[v.name] = len(v.type.tensor_type.shape.dim)
    for t in graph.initializer:
        elem[t.name], ranks[t.name] = t.data_type, len(t.dims)
    return elem, ranks


class Types:
    """Element types and ranks of a shape-inferred graph's tensors, for the rules' predicates."""

    def __init__(self, graph: onnx.GraphProto):
        self.elem, self.ranks = tensor_types(graph)
        self.constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                                 for o in n.output}

    def is_float(self, name: str) -> bool:
        return self.elem.get(name) in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)

    def is_runtime_float16(self, name: str | None) -> bool:
        return bool(name) and name not in self.constants and self.elem.get(name) == TensorProto.FLOAT16

    def is_integer(self, name: str) -> bool:
        return name in self.elem and not self.is_float(name) and self.elem[name] != TensorProto.BOOL


def _axis_is_first(node: onnx.NodeProto, types: Types) -> bool:
    axis = _attr(node, "axis", -1)
    return axis == 0 or axis == -types.ranks.get(node.input[0], 0)


@dataclass(frozen=True)
class Rule:
    op: str
    applies: Callable[[onnx.NodeProto, Types], bool]
    reason: str


RULES = [
    Rule("ScatterElements", lambda n, t: True, "TVM 0.27 cannot schedule its scatter loop"),
    Rule("MaxUnpool", lambda n, t: True, "TVM 0.27 cannot schedule its scatter loop"),
    Rule("NonMaxSuppression", lambda n, t: True,
         "its output has a data-dependent shape (the number of boxes kept); edgeq needs static shapes"),
    Rule("BatchNormalization", lambda n, t: bool(_attr(n, "training_mode", 0)),
         "attribute training_mode=1: edgeq compiles models for inference"),
    Rule("ConvTranspose", lambda n, t: _attr(n, "output_shape") is not None,
         "attribute output_shape is ignored by TVM 0.27's importer; give pads and output_padding instead"),
    Rule("SpaceToDepth", lambda n, t: _text(_attr(n, "mode", "DCR")) != "DCR",
         "attribute mode other than DCR is ignored by TVM 0.27's importer"),
    Rule("RoiAlign", lambda n, t: _text(_attr(n, "mode", "avg")) != "avg",
         "attribute mode=max is computed as avg by TVM 0.27's importer"),
    Rule("IsInf", lambda n, t: not (_attr(n, "detect_negative", 1) and _attr(n, "detect_positive", 1)),
         "attribute detect_negative=0 or detect_positive=0 is ignored by TVM 0.27's importer"),
    Rule("Pow", lambda n, t: t.is_integer(n.input[0]), "an integer base: TVM 0.27's power is float-only"),
    Rule("RMSNormalization", _axis_is_first,
         "attribute axis=0 (normalizing over every axis) fails in TVM 0.27's lowering"),
    Rule("QLinearMatMul", lambda n, t: any(t.is_runtime_float16(n.input[i]) for i in (1, 4, 6)),
         "float16 scales given at run time: the float chain edgeq imports it as would round every product to "
         "float16 (constant scales are widened to float32)"),
    Rule("Mod", lambda n, t: not _attr(n, "fmod", 0) and t.is_float(n.input[0]),
         "attribute fmod=0 on floating-point inputs (ONNX requires fmod=1 for them)"),
]
_RULES_BY_OP: dict[str, list[Rule]] = {}
for _rule in RULES:
    _RULES_BY_OP.setdefault(_rule.op, []).append(_rule)


def _type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type).lower()


def signature_refusals(proto: onnx.ModelProto) -> list[str]:
    """Graph inputs and outputs edgeq cannot take or give: non-tensors, and element types it cannot compute."""
    problems = []
    for kind, items in (("input", proto.graph.input), ("output", proto.graph.output)):
        for v in items:
            if not v.type.HasField("tensor_type"):
                problems.append(f"graph {kind} {v.name!r} is a {v.type.WhichOneof('value')}: edgeq compiles "
                                "tensor graphs (no sequences, optionals or maps)")
            elif v.type.tensor_type.elem_type in UNSUPPORTED_ELEM_TYPES:
                problems.append(f"graph {kind} {v.name!r} is {_type_name(v.type.tensor_type.elem_type)}, "
                                "which TVM 0.27's CPU code cannot compute")
    return problems


def _node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"#{index} ({node.output[0] if node.output else 'no output'})"


def refusals(proto: onnx.ModelProto) -> list[str]:
    """Why edgeq cannot compile this (shape-inferred) model's nodes, one line per problem; empty if none."""
    graph = proto.graph
    types = Types(graph)
    values = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}
    problems = []
    for i, node in enumerate(graph.node):
        name = _node_name(node, i)
        for rule in _RULES_BY_OP.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ():
            if rule.applies(node, types):
                problems.append(f"{node.op_type} node {name!r}: {rule.reason}")
        for output in node.output:
            value = values.get(output)
            if value is None:
                continue
            which = value.type.WhichOneof("value")
            if which != "tensor_type":
                problems.append(f"{node.op_type} node {name!r} produces a {which} ({output!r}): edgeq compiles "
                                "tensor graphs (no sequences, optionals or maps)")
            elif value.type.tensor_type.elem_type in UNSUPPORTED_ELEM_TYPES:
                problems.append(f"{node.op_type} node {name!r} produces {output!r} of type "
                                f"{_type_name(value.type.tensor_type.elem_type)}, which TVM 0.27's CPU code cannot "
                                "compute")
    return problems
