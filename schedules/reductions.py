"""Float max / min reductions that start from -inf / +inf, as ONNX's ReduceMax / ReduceMin do.

TVM 0.27 legalizes ``relax.max`` with the lowest finite float as the reduction's initial value, so the max of
a row of -inf is -3.4e38, not -inf. Attention masks rely on it: ONNX's Attention function (and models written
the same way) detect a fully masked row by ``ReduceMax(bias) == -inf`` and zero its softmax; with the finite
start the test fails and the row becomes NaN. Integer reductions keep TVM's legalization.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, te


def _reducer(name: str):
    combine = tvm.tirx.max if name == "max" else tvm.tirx.min
    start = -math.inf if name == "max" else math.inf
    return te.comm_reducer(lambda a, b: combine(a, b), lambda dtype: tvm.tirx.const(start, dtype), name=name)


def _legalize(name: str):
    reducer = _reducer(name)
    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        data = call.args[0]
        if not isinstance(data.ty, relax.TensorType) or "float" not in str(data.ty.dtype) or data.ty.shape is None:
            return _TVM_LEGALIZE[name](bb, call)
        ndim = len(data.ty.shape.values)
        axes = sorted({int(a) % ndim for a in call.attrs.axis} if call.attrs.axis is not None else range(ndim))
        keepdims = bool(call.attrs.keepdims)

        def compute(x):
            reduce_axes = {a: te.reduce_axis((0, x.shape[a]), name=f"k{a}") for a in axes}
            kept = [d for d in range(ndim) if d not in reduce_axes]
            out_shape = [1 if d in reduce_axes else x.shape[d] for d in range(ndim)] if keepdims \
                else [x.shape[d] for d in kept]

            def element(*index):
                spatial = dict(zip(range(ndim), index)) if keepdims else dict(zip(kept, index))
                full = [reduce_axes[d] if d in reduce_axes else spatial[d] for d in range(ndim)]
                return reducer(x[tuple(full)], axis=list(reduce_axes.values()))

            return te.compute(out_shape, element, name=f"{x.name}_red")

        return bb.call_te(compute, data, primfunc_name_hint=name)

    return legalize


_TVM_LEGALIZE = {name: tvm.ir.Op.get(f"relax.{name}").get_attr("FLegalize") for name in ("max", "min")}

# LegalizeOps' customize_legalize_map: relax op name -> legalization
INFINITE_START_REDUCTIONS = {f"relax.{name}": _legalize(name) for name in ("max", "min")}
