"""QOperator -> QDQ: rewrite ONNX Runtime's integer operators as DequantizeLinear -> float op -> QuantizeLinear.

TVM's Relax ONNX frontend imports QuantizeLinear/DequantizeLinear but not QLinearConv, QLinearMatMul or ONNX
Runtime's com.microsoft QLinearAdd/QLinearMul/QLinearGlobalAveragePool/QGemm, which ``quantize_static(...,
quant_format=QuantFormat.QOperator)`` emits (with Relu folded into the output range).  Each such node becomes
the equivalent QDQ chain with the same tensor names at its boundaries, so the rest of the graph is untouched
and edgeq's QDQ pipeline can take the model from there.

Numerics: the integer op rounds once (int32 accumulator -> output grid) and so does the chain (float result
-> QuantizeLinear); the two can differ by one step where the float sum lands within rounding error of a
tie.  Bias (int32, zero point 0) is dequantized with scale x_scale * w_scale, as it was quantized.

ConvInteger (from dynamic quantization) becomes DequantizeLinear(scale 1) -> Conv -> Cast(int32), which is
exact while every partial sum stays below 2^24 (the float32 integer range); that is checked from the
weights, and a ConvInteger that could exceed it (or has non-constant weights) is left as it is.
Subgraphs (If/Loop bodies) are not visited.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
_PER_AXIS_OPSET = 13  # QuantizeLinear/DequantizeLinear gained the axis attribute in opset 13


class _Rewriter:
    """The graph being rewritten: known constants, fresh names, and whether per-axis Q/DQ was emitted."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.graph = graph
        self.constants = {t.name: t for t in graph.initializer}
        for node in graph.node:  # Constant nodes carry scales and zero points in some exporters
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = node.attribute[0].t
        self.ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in
                      [*graph.input, *graph.output, *graph.value_info] if v.type.tensor_type.HasField("shape")}
        self.ranks.update({name: len(t.dims) for name, t in self.constants.items()})
        self.names = {n for node in graph.node for n in [*node.input, *node.output, node.name]}
        self.names |= set(self.constants) | {v.name for v in [*graph.input, *graph.output]}
        self.per_axis = False

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def array(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.constants[name]) if name in self.constants else None

    def constant(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        tensor = numpy_helper.from_array(np.asarray(value), name)
        self.graph.initializer.append(tensor)
        self.constants[name] = tensor
        return name

    def axis_of(self, node, scale: str, axis: int) -> int | None:
        """None for a per-tensor scale, else ``axis``; the scale must be a scalar or a vector."""
        value = self.array(scale)
        if value is not None and value.size == 1:
            return None
        if value is not None and value.ndim != 1:
            raise ValueError(f"node {node.name!r} ({node.op_type}): scale {scale!r} has shape {value.shape}; "
                             "expected a scalar or a per-channel vector")
        self.per_axis = True
        return axis

    def float32_scale(self, scale: str) -> str:
        """A float16 constant scale as a float32 one: the integer op's result is rounded once from exact
        products; a float16 chain would round every product and partial sum to 11 bits first."""
        value = self.array(scale)
        if value is None or value.dtype != np.float16:
            return scale
        return self.constant(f"{scale}_float32", value.astype(np.float32))

    def dequantize(self, node, tag: str, value: str, scale: str, zero_point: str | None, axis: int | None = None):
        scale = self.float32_scale(scale)
        out = self.fresh(f"{value}_dequantized")
        inputs = [value, scale] + ([zero_point] if zero_point else [])
        attrs = {} if axis is None else {"axis": axis}
        return helper.make_node("DequantizeLinear", inputs, [out], name=self.fresh(f"{node.name}/dequantize_{tag}"),
                                **attrs), out

    def quantize(self, node, value: str, scale: str, zero_point: str, output: str):
        return helper.make_node("QuantizeLinear", [value, self.float32_scale(scale), zero_point], [output],
                                name=self.fresh(f"{node.name}/quantize"))


def _inputs(node, count: int) -> list[str | None]:
    """The node's inputs padded to ``count``; absent optional inputs ('' or missing) are None."""
    names = list(node.input) + [""] * (count - len(node.input))
    return [n or None for n in names]


def _per_tensor(r: _Rewriter, node, *scales: str | None) -> None:
    for scale in filter(None, scales):
        value = r.array(scale)
        if value is not None and value.size != 1:
            raise ValueError(f"node {node.name!r} ({node.op_type}): scale {scale!r} has {value.size} values; "
                             "only per-tensor activation scales are supported")


def _bias(r: _Rewriter, node, bias: str, x_scale: str, w_scale: str, axis: int | None):
    """DequantizeLinear of an int32 bias with scale x_scale * w_scale (a constant when both scales are)."""
    nodes, shape = [], ()
    x, w = r.array(x_scale), r.array(w_scale)
    if x is not None and w is not None:
        value = (x.astype(np.float32) * w.astype(np.float32)).astype(np.float32)
        scale, shape = r.constant(f"{bias}_scale", value), value.shape
    else:
        scale = r.fresh(f"{bias}_scale")
        nodes.append(helper.make_node("Mul", [x_scale, w_scale], [scale], name=r.fresh(f"{node.name}/bias_scale")))
    zero = r.constant(f"{bias}_zero_point", np.zeros(shape, np.int32))  # the scale's shape, as DQ wants
    dq, out = r.dequantize(node, "bias", bias, scale, zero, axis)
    return nodes + [dq], out


def _float_op(r: _Rewriter, node, op_type: str, inputs: list[str], **attrs):
    out = r.fresh(f"{node.output[0]}_float")
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attributes.update(attrs)
    return helper.make_node(op_type, inputs, [out], name=r.fresh(f"{node.name}/{op_type.lower()}"),
                            **attributes), out


def _qlinear_conv(r: _Rewriter, node):
    x, xs, xz, w, ws, wz, ys, yz, b = _inputs(node, 9)
    _per_tensor(r, node, xs, ys)
    w_axis = r.axis_of(node, ws, 0)
    weight = r.array(w)
    scale = r.array(ws)
    if weight is not None and scale is not None and scale.size not in (1, weight.shape[0]):
        raise ValueError(f"node {node.name!r} (QLinearConv): {scale.size} weight scales for {weight.shape[0]} "
                         "output channels")
    dq_x, xf = r.dequantize(node, "x", x, xs, xz)
    dq_w, wf = r.dequantize(node, "w", w, ws, wz, w_axis)
    nodes, inputs = [dq_x, dq_w], [xf, wf]
    if b:
        bias_nodes, bf = _bias(r, node, b, xs, ws, w_axis)
        nodes, inputs = nodes + bias_nodes, inputs + [bf]
    conv, yf = _float_op(r, node, "Conv", inputs)
    return nodes + [conv, r.quantize(node, yf, ys, yz, node.output[0])]


def _qlinear_matmul(r: _Rewriter, node):
    a, as_, az, b, bs, bz, ys, yz = _inputs(node, 8)
    _per_tensor(r, node, as_, ys)  # per-row a scales are in the spec but never emitted by ONNX Runtime
    rank = r.ranks.get(b)
    b_axis = r.axis_of(node, bs, rank - 1 if rank else -1)  # per column: the last axis of b
    dq_a, af = r.dequantize(node, "a", a, as_, az)
    dq_b, bf = r.dequantize(node, "b", b, bs, bz, b_axis)
    matmul, yf = _float_op(r, node, "MatMul", [af, bf])
    return [dq_a, dq_b, matmul, r.quantize(node, yf, ys, yz, node.output[0])]


def _qgemm(r: _Rewriter, node):
    """com.microsoft.QGemm: Y = alpha * a_scale * b_scale * (A'B' + C), C int32; float Y when y_scale is absent."""
    a, as_, az, b, bs, bz, c, ys, yz = _inputs(node, 9)
    _per_tensor(r, node, as_, ys)
    if ys and not yz:
        raise ValueError(f"node {node.name!r} (QGemm): y_scale without y_zero_point is not supported")
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    b_axis = r.axis_of(node, bs, 0 if attributes.get("transB", 0) else 1)  # per column of B'
    dq_a, af = r.dequantize(node, "a", a, as_, az)
    dq_b, bf = r.dequantize(node, "b", b, bs, bz, b_axis)
    nodes, inputs = [dq_a, dq_b], [af, bf]
    if c:
        c_axis = None if b_axis is None else r.ranks.get(c, 1) - 1  # per column: C is (N,), (1, N) or (M, N)
        bias_nodes, cf = _bias(r, node, c, as_, bs, c_axis)
        nodes, inputs = nodes + bias_nodes, inputs + [cf]
    gemm, yf = _float_op(r, node, "Gemm", inputs, beta=attributes.get("alpha", 1.0))
    if not ys:
        gemm.output[0] = node.output[0]
        return nodes + [gemm]
    return nodes + [gemm, r.quantize(node, yf, ys, yz, node.output[0])]


def _qlinear_binary(op_type: str):
    def rewrite(r: _Rewriter, node):
        a, as_, az, b, bs, bz, ys, yz = _inputs(node, 8)
        _per_tensor(r, node, as_, bs, ys)
        yz = yz or az or bz  # an absent output zero point: 0 of the inputs' type
        if not yz:
            raise ValueError(f"node {node.name!r} ({node.op_type}): no zero point gives the output type")
        dq_a, af = r.dequantize(node, "a", a, as_, az)
        dq_b, bf = r.dequantize(node, "b", b, bs, bz)
        float_node, yf = _float_op(r, node, op_type, [af, bf])
        return [dq_a, dq_b, float_node, r.quantize(node, yf, ys, yz, node.output[0])]

    return rewrite


def _qlinear_global_average_pool(r: _Rewriter, node):
    x, xs, xz, ys, yz = _inputs(node, 5)
    _per_tensor(r, node, xs, ys)
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("channels_last", 0):
        raise ValueError(f"node {node.name!r} (QLinearGlobalAveragePool): channels_last=1 is not supported")
    dq_x, xf = r.dequantize(node, "x", x, xs, xz)
    pool = helper.make_node("GlobalAveragePool", [xf], [r.fresh(f"{node.output[0]}_float")],
                            name=r.fresh(f"{node.name}/globalaveragepool"))
    return [dq_x, pool, r.quantize(node, pool.output[0], ys, yz or xz, node.output[0])]


def _conv_integer(r: _Rewriter, node):
    """Exact as float while 255 * sum |w - w_zero_point| < 2^24 in every output channel; else left alone."""
    x, w, xz, wz = _inputs(node, 4)
    weight = r.array(w)
    w_zero = r.array(wz) if wz else np.zeros((), np.int64)
    if weight is None or w_zero is None:
        return None  # non-constant weights: the bound cannot be checked
    per_channel = w_zero.size > 1
    zeros = np.asarray(w_zero, np.int64).reshape((-1,) + (1,) * (weight.ndim - 1) if per_channel else ())
    worst = 255 * np.abs(weight.astype(np.int64) - zeros).reshape(weight.shape[0], -1).sum(axis=1).max(initial=0)
    if worst >= 2**24:  # |x - x_zero_point| <= 255 for both uint8 and int8
        return None
    x_unit = r.constant(f"{node.name}/x_unit_scale", np.float32(1.0))  # x_zero_point is a scalar
    w_unit = r.constant(f"{node.name}/w_unit_scale", np.ones(w_zero.shape, np.float32))
    dq_x, xf = r.dequantize(node, "x", x, x_unit, xz)
    dq_w, wf = r.dequantize(node, "w", w, w_unit, wz, r.axis_of(node, w_unit, 0))
    conv, yf = _float_op(r, node, "Conv", [xf, wf])
    cast = helper.make_node("Cast", [yf], [node.output[0]], name=r.fresh(f"{node.name}/cast"), to=TensorProto.INT32)
    return [dq_x, dq_w, conv, cast]


REWRITES = {
    ("", "QLinearConv"): _qlinear_conv,
    ("", "QLinearMatMul"): _qlinear_matmul,
    ("", "ConvInteger"): _conv_integer,
    (MS_DOMAIN, "QGemm"): _qgemm,
    (MS_DOMAIN, "QLinearAdd"): _qlinear_binary("Add"),
    (MS_DOMAIN, "QLinearMul"): _qlinear_binary("Mul"),
    (MS_DOMAIN, "QLinearGlobalAveragePool"): _qlinear_global_average_pool,
}


def to_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every QOperator node of ``REWRITES`` replaced by its QDQ chain.

    The default-domain opset is kept, except that per-axis (per-channel) scales need opset 13: older models
    are then converted with onnx.version_converter.  Raises ValueError naming a node it cannot rewrite.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    r = _Rewriter(result)
    nodes, changed = [], False
    for node in result.graph.node:
        rewrite = REWRITES.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
        if rewrite and not node.name:  # the produced nodes' names derive from it
            node.name = r.fresh(f"{node.op_type}_{node.output[0]}")
        replacement = rewrite(r, node) if rewrite else None
        nodes.extend(replacement or [node])
        changed |= replacement is not None
    if not changed:
        return onnx.ModelProto.FromString(model.SerializeToString())
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    opset = next((o for o in result.opset_import if o.domain in ("", "ai.onnx")), None)
    if r.per_axis and opset is not None and opset.version < _PER_AXIS_OPSET:
        try:
            result = onnx.version_converter.convert_version(result, _PER_AXIS_OPSET)
        except Exception as error:  # the converter raises several types
            raise ValueError(f"per-channel scales need opset {_PER_AXIS_OPSET}, and converting the model from "
                             f"opset {opset.version} failed: {error}") from error
    return result
