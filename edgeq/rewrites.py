"""ONNX-level rewrites before import: op forms TVM 0.27's importer gets wrong, replaced by equivalent ONNX.

Each rewrite was found by the ONNX conformance run (benchmarks/conformance.py), where the original form gave
wrong outputs or an internal error, and each keeps the node's output names, so the rest of the graph and the
user's names (--exclude, outputs) are untouched. REWRITES maps an op type to its function, which returns the
nodes replacing the node, or None to keep it.

* Dropout: the inference form. Output = input; the mask (when used) all ones, bool from opset 10 and the data's
  type before. TVM imports a (data, mask) tuple that the CPU layout pass cannot map, and types the mask as the
  data at every opset. A Dropout in training mode is refused.
* Split into one output: the input itself. TVM's importer returns a tensor where the graph expects a tuple
  ("Invalid Call"); found by benchmarks/fuzz.py.
* BitShift by a runtime amount: ONNX defines a shift by a negative amount or by the type's width or more
  (0 for a left shift, the sign for a right shift of a signed type); LLVM makes such lanes poison.
* Pow of a float by an integer exponent: the exponent cast to the base's type (TVM's power wants one type).
* LayerNormalization with its Mean / InvStdDev outputs used: TVM imports those with wrong shapes; they are
  computed by ReduceMean as the ONNX function body defines them, in the stash type.
* Softplus and Mish: TVM computes log(1 + exp(x)), which loses all precision below x = -15 (1 + e rounds to 1)
  and overflows above 88. Below -7 softplus(x) = exp(x) within 5e-4 relative (log(1 + e) = e - e^2/2 + ...);
  above 20 it is x within 2e-9.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import EdgeqError
from .support import tensor_types

_FLOATS = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)
_SIGNED = (TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64)


class Context:
    """The graph being rewritten: element types and ranks (non-strict shape inference), constants, fresh names."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        graph = proto.graph
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
        try:
            inferred = onnx.shape_inference.infer_shapes(proto).graph
        except Exception:  # noqa: BLE001 - strict inference runs later and reports the model's problem
            inferred = graph
        self.types, self.ranks = tensor_types(inferred)
        self.constants = {t.name: t for t in graph.initializer}
        self.constants.update({n.output[0]: n.attribute[0].t for n in graph.node
                               if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
        self.names = {name for n in graph.node for name in (*n.input, *n.output, n.name)} | set(self.types)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def constant(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.proto.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs) -> tuple[onnx.NodeProto, str]:
        """A new node with one fresh output named after `base`; returns it and its output."""
        out = self.fresh(base)
        return helper.make_node(op, inputs, [out], name=out, **attrs), out

    def is_false(self, name: str) -> bool:
        return not name or (name in self.constants and not numpy_helper.to_array(self.constants[name]).any())


def _attr(node: onnx.NodeProto, name: str, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _dropout(ctx: Context, node: onnx.NodeProto):
    if len(node.input) > 2 and not ctx.is_false(node.input[2]):
        raise EdgeqError(f"Dropout node {_name(node)!r} runs in training mode (training_mode is not a constant "
                         "false): edgeq compiles models for inference")
    nodes = [helper.make_node("Identity", [node.input[0]], [node.output[0]], name=_name(node))]
    if len(node.output) > 1 and node.output[1]:
        mask_type = TensorProto.BOOL if ctx.opset >= 10 else ctx.types.get(node.input[0], TensorProto.FLOAT)
        one = numpy_helper.from_array(np.ones(1, helper.tensor_dtype_to_np_dtype(mask_type)))
        shape, shape_out = ctx.node("Shape", [node.input[0]], f"{_name(node)}/mask_shape")
        nodes += [shape, helper.make_node("ConstantOfShape", [shape_out], [node.output[1]], name=f"{_name(node)}/mask",
                                          value=one)]
    return nodes


def _split_into_one(ctx: Context, node: onnx.NodeProto):
    if len(node.output) != 1:
        return None
    return [helper.make_node("Identity", [node.input[0]], [node.output[0]], name=_name(node))]


def _bit_shift(ctx: Context, node: onnx.NodeProto):
    x, y = node.input
    if y in ctx.constants or y not in ctx.types:
        return None
    dtype = helper.tensor_dtype_to_np_dtype(ctx.types[y])
    bits = 8 * np.dtype(dtype).itemsize
    base = _name(node)
    shifted, shifted_out = ctx.node("BitShift", [x, y], f"{base}/unbounded", direction=_attr(node, "direction"))
    below, below_out = ctx.node("Less", [y, ctx.constant(f"{base}/bits", np.array(bits, dtype))], f"{base}/below_width")
    zero = ctx.constant(f"{base}/zero", np.array(0, dtype))
    above, above_out = ctx.node("GreaterOrEqual", [y, zero], f"{base}/non_negative")
    both, in_range = ctx.node("And", [below_out, above_out], f"{base}/in_range")
    nodes = [shifted, below, above, both]
    if _attr(node, "direction") == b"RIGHT" and ctx.types[x] in _SIGNED:  # the sign: x >> (bits - 1)
        sign, fallback = ctx.node("BitShift", [x, ctx.constant(f"{base}/sign_shift", np.array(bits - 1, dtype))],
                                  f"{base}/sign", direction=b"RIGHT")
        nodes.append(sign)
    else:
        fallback = zero
    return nodes + [helper.make_node("Where", [in_range, shifted_out, fallback], [node.output[0]], name=base)]


def _pow(ctx: Context, node: onnx.NodeProto):
    base_type, exponent_type = ctx.types.get(node.input[0]), ctx.types.get(node.input[1])
    if base_type not in _FLOATS or exponent_type in (None, base_type):
        return None
    cast, exponent = ctx.node("Cast", [node.input[1]], f"{_name(node)}/exponent", to=base_type)
    return [cast, helper.make_node("Pow", [node.input[0], exponent], list(node.output), name=_name(node))]


def _layer_norm_statistics(ctx: Context, node: onnx.NodeProto):
    """Mean and InvStdDev (keepdims over axes axis..rank-1, in the stash type) beside a one-output LayerNorm."""
    if not any(len(node.output) > i and node.output[i] for i in (1, 2)) or node.input[0] not in ctx.ranks:
        return None
    x, rank, base = node.input[0], ctx.ranks[node.input[0]], _name(node)
    axis = _attr(node, "axis", -1) % rank
    axes = list(range(axis, rank))
    stash = _attr(node, "stash_type", TensorProto.FLOAT)
    epsilon = _attr(node, "epsilon", 1e-5)
    nodes = [helper.make_node("LayerNormalization", list(node.input), [node.output[0]], name=base,
                              **{a.name: helper.get_attribute_value(a) for a in node.attribute})]
    if ctx.types.get(x) != stash:
        cast, x = ctx.node("Cast", [x], f"{base}/stashed", to=stash)
        nodes.append(cast)

    def reduce_mean(value: str, out: str | None, label: str) -> str:
        if ctx.opset >= 18:
            inputs, attrs = [value, ctx.constant(f"{base}/axes", np.array(axes, np.int64))], {}
        else:
            inputs, attrs = [value], {"axes": axes}
        out = out or ctx.fresh(f"{base}/{label}")
        nodes.append(helper.make_node("ReduceMean", inputs, [out], name=ctx.fresh(f"{base}/{label}_op"), keepdims=1,
                                      **attrs))
        return out

    wanted_mean = node.output[1] if len(node.output) > 1 and node.output[1] else None
    mean = reduce_mean(x, wanted_mean, "mean")
    if len(node.output) > 2 and node.output[2]:
        eps = ctx.constant(f"{base}/epsilon", np.array(epsilon, helper.tensor_dtype_to_np_dtype(stash)))
        diff, diff_out = ctx.node("Sub", [x, mean], f"{base}/centered")
        square, square_out = ctx.node("Mul", [diff_out, diff_out], f"{base}/squared")
        nodes += [diff, square]
        var = reduce_mean(square_out, None, "variance")
        add, add_out = ctx.node("Add", [var, eps], f"{base}/variance_eps")
        root, root_out = ctx.node("Sqrt", [add_out], f"{base}/std")
        nodes += [add, root, helper.make_node("Reciprocal", [root_out], [node.output[2]], name=f"{base}/inv_std")]
    return nodes


def _stable_softplus(ctx: Context, x: str, base: str, out: str | None = None) -> tuple[list, str]:
    dtype = helper.tensor_dtype_to_np_dtype(ctx.types.get(x, TensorProto.FLOAT))
    exp, exp_out = ctx.node("Exp", [x], f"{base}/exp")
    plus, plus_out = ctx.node("Add", [exp_out, ctx.constant(f"{base}/one", np.array(1, dtype))], f"{base}/one_plus_exp")
    log, log_out = ctx.node("Log", [plus_out], f"{base}/log")
    low, low_out = ctx.node("Less", [x, ctx.constant(f"{base}/low", np.array(-7, dtype))], f"{base}/is_low")
    high, high_out = ctx.node("Greater", [x, ctx.constant(f"{base}/high", np.array(20, dtype))], f"{base}/is_high")
    upper, upper_out = ctx.node("Where", [high_out, x, log_out], f"{base}/upper")
    out = out or ctx.fresh(f"{base}/softplus")
    where = helper.make_node("Where", [low_out, exp_out, upper_out], [out], name=ctx.fresh(f"{base}/softplus_op"))
    return [exp, plus, log, low, high, upper, where], out


def _softplus(ctx: Context, node: onnx.NodeProto):
    if ctx.types.get(node.input[0]) not in _FLOATS:
        return None
    nodes, _ = _stable_softplus(ctx, node.input[0], _name(node), node.output[0])
    return nodes


def _mish(ctx: Context, node: onnx.NodeProto):
    if ctx.types.get(node.input[0]) not in _FLOATS:
        return None
    x, base = node.input[0], _name(node)
    nodes, softplus = _stable_softplus(ctx, x, base)
    tanh, tanh_out = ctx.node("Tanh", [softplus], f"{base}/tanh")
    return nodes + [tanh, helper.make_node("Mul", [x, tanh_out], [node.output[0]], name=base)]


REWRITES: dict[str, Callable[[Context, onnx.NodeProto], list | None]] = {
    "Dropout": _dropout,
    "Split": _split_into_one,
    "BitShift": _bit_shift,
    "Pow": _pow,
    "LayerNormalization": _layer_norm_statistics,
    "Softplus": _softplus,
    "Mish": _mish,
}


def rewrite(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model (changed in place) with every node REWRITES has a rewrite for replaced by its rewrite."""
    graph = proto.graph
    if not any(n.op_type in REWRITES and n.domain in ("", "ai.onnx") for n in graph.node):
        return proto
    ctx = Context(proto)
    nodes = []
    for node in graph.node:
        replacement = REWRITES[node.op_type](ctx, node) if node.op_type in REWRITES and node.domain in ("", "ai.onnx") else None
        nodes.extend([node] if replacement is None else replacement)
    graph.ClearField("node")
    graph.node.extend(nodes)
    return proto
