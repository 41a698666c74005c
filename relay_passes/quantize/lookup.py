"""Elementwise float islands between two 8-bit tensors, as 256-entry lookup tables.

``quantize(f(dequantize(x)))`` where ``f`` is a chain of elementwise ops on x alone (and scalar constants) --
hard-swish ``x * clip(x + 3, 0, 6) / 6``, SiLU ``x * sigmoid(x)``, hard-sigmoid, GELU, tanh -- maps each of x's
256 codes to one output code. The pass evaluates ``f`` on all of them once, at compile time, in float32 numpy
with ONNX's formulas (DequantizeLinear, then f, then QuantizeLinear's round-half-even and saturation), and
the kernel becomes one table read per element: no float arithmetic, and no layout change (a table does not
care where the channels are, so the NHWC tensors of the integer kernels stay NHWC around it).

The table is exact: the output codes are those of the QDQ model's own float formula, evaluated in float32.
(TVM's float path would differ from it only where its vectorized exp/erf, a few ulps off, moves a value
across a rounding boundary.)

    island_table(defs, dequantized, expr, out_qp) -> (QTensor var of x, table) or None
"""

from __future__ import annotations

import numpy as np
import scipy.special

from schedules import scheme
from .exprs import const, is_const, op_name

_MAX_OPS = 16  # an island is a short activation chain; anything longer is left to the float path


def _sigmoid(x):
    return (1 / (1 + np.exp(-x))).astype(np.float32)


def _gelu(x):
    return (0.5 * x * (1 + scipy.special.erf(x * np.float32(0.7071067811865476)))).astype(np.float32)


def _gelu_tanh(x):
    inner = np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x)
    return (0.5 * x * (1 + np.tanh(inner))).astype(np.float32)


# relax op -> float32 numpy function of (tensor operands..., call): the ops an island may hold
_ELEMENTWISE = {
    "relax.add": lambda a, b, _: a + b,
    "relax.subtract": lambda a, b, _: a - b,
    "relax.multiply": lambda a, b, _: a * b,
    "relax.divide": lambda a, b, _: a / b,
    "relax.minimum": lambda a, b, _: np.minimum(a, b),
    "relax.maximum": lambda a, b, _: np.maximum(a, b),
    "relax.negative": lambda a, _: -a,
    "relax.nn.relu": lambda a, _: np.maximum(a, np.float32(0)),
    "relax.clip": lambda a, call: np.clip(a, np.float32(call.args[1].value), np.float32(call.args[2].value)),
    "relax.sigmoid": lambda a, _: _sigmoid(a),
    "relax.nn.silu": lambda a, _: a * _sigmoid(a),
    "relax.tanh": lambda a, _: np.tanh(a),
    "relax.exp": lambda a, _: np.exp(a),
    "relax.erf": lambda a, _: scipy.special.erf(a).astype(np.float32),
    "relax.nn.gelu": lambda a, _: _gelu(a),
    "relax.nn.gelu_tanh": lambda a, _: _gelu_tanh(a),
}
_TENSOR_OPERANDS = {"relax.clip": 1}  # ops whose later arguments are attributes (PrimValues), not tensors


def island_table(defs: dict, dequantized, expr, out_qp: scheme.QParams):
    """(the 8-bit var x, the int table over x's codes) when `expr` is an elementwise island on one dequantized
    per-tensor 8-bit tensor; None otherwise. `dequantized(var)` gives the QTensor behind a dequantize or None."""
    from tvm import relax

    sources, ops = [], [0]

    def build(e):  # a numpy function of the island's input values, or None
        if is_const(e):
            value = const(e)
            scalar = np.float32(value.reshape(())) if value.size == 1 else None
            return None if scalar is None else (lambda _x: scalar)
        if not isinstance(e, relax.Var) or e not in defs:
            return None
        qt = dequantized(e)
        if qt is not None:
            sources.append(qt)
            return lambda x: x
        value, ops[0] = defs[e], ops[0] + 1
        op = op_name(value)
        if op not in _ELEMENTWISE or ops[0] > _MAX_OPS:
            return None
        operands = [build(a) for a in value.args[:_TENSOR_OPERANDS.get(op, len(value.args))]]
        if any(f is None for f in operands):
            return None
        fn = _ELEMENTWISE[op]
        return lambda x: np.asarray(fn(*(f(x) for f in operands), value), np.float32)

    island = build(expr)
    if island is None or is_const(expr) or dequantized(expr) is not None or not sources:
        return None
    if any(qt.var is not sources[0].var for qt in sources):
        return None  # two different tensors: no single table
    qt = sources[0]
    qmin, qmax = scheme.DTYPE_RANGES[qt.dtype]
    codes = np.arange(qmin, qmax + 1)
    x = scheme.dequantize(codes, scheme.QParams(np.float32(qt.scale), np.int32(qt.zero_point), qt.dtype))
    with np.errstate(all="ignore"):
        y = island(x)
    if y.shape != x.shape or not np.all(np.isfinite(y)):
        return None
    return qt, scheme.quantize(y, out_qp)
