"""Concatenation as one copy loop per input, instead of TVM's one loop over the output with a branch per element.

TVM legalizes ``concat`` into a single compute whose every element picks its input with a chain of
``if_then_else`` on the concatenation axis. Fused with the transposes and reshapes around it (a detection head:
three NHWC feature maps -> [1, 84, anchors], then sigmoid on a slice of it), each output element evaluates the
whole chain, the index arithmetic of every branch cannot be proven linear, and the kernel stays scalar: YOLOv8n's
box decode took 1.2 ms (fp32) and 1.8 ms (int8) of a 10 ms model for 176k output values. Here input ``i`` gets
a block of its own that writes its slice ``[offset_i, offset_i + size_i)`` of the output: producers inline into
their part (one consumer each), every part is a plain copy that vectorizes along the written or the read axis,
and consumers of the whole output run as a separate elementwise pass.

`CONCAT_PARTS` is a LegalizeOps entry for relax.concat with static shapes (others keep TVM's legalization). The
PrimFunc is marked injective, so FuseOps still fuses it with its neighbours.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

_TVM_CONCAT = tvm.ir.Op.get("relax.concat").get_attr("FLegalize")
_INJECTIVE = 2  # relay/relax OpPatternKind kInjective


def _static_shape(ty) -> list[int] | None:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    values = ty.shape.values
    return [int(v) for v in values] if all(isinstance(v, tirx.IntImm) for v in values) else None


def concat_parts_func(shapes: list[list[int]], axis: int, dtype: str) -> tirx.PrimFunc:
    """out = concat(inputs, axis) with one block per input writing its slice of ``out``."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    out_shape = list(shapes[0])
    out_shape[axis] = sum(s[axis] for s in shapes)
    with IRBuilder() as builder:
        with T.prim_func(s_tir=True):
            T.func_name("concatenate")
            T.func_attr({"tirx.noalias": True, "op_pattern": _INJECTIVE})
            inputs = [T.arg(f"part{i}", T.buffer([tirx.IntImm("int64", d) for d in s], dtype))
                      for i, s in enumerate(shapes)]
            out = T.arg("T_concat", T.buffer([tirx.IntImm("int64", d) for d in out_shape], dtype))
            offset = 0
            for i, (data, shape) in enumerate(zip(inputs, shapes)):
                with T.grid(*[tirx.IntImm("int64", d) for d in shape]) as loops:
                    with T.sblock(f"T_concat_part{i}"):
                        index = T.axis.remap("S" * len(shape), loops)
                        where = list(index)
                        where[axis] = where[axis] + tirx.IntImm("int64", offset)
                        T.reads(data[tuple(index)])
                        T.writes(out[tuple(where)])
                        T.buffer_store(out, data[tuple(index)], where)
                offset += shape[axis]
    return builder.get()


def _legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    fields = call.args[0]
    types = [f.ty for f in fields.fields] if isinstance(fields, relax.Tuple) else []
    shapes = [_static_shape(t) for t in types]
    out_shape = _static_shape(call.ty)
    if len(shapes) < 2 or out_shape is None or any(s is None or len(s) != len(out_shape) for s in shapes) \
            or len({str(t.dtype) for t in types}) != 1:
        return _TVM_CONCAT(bb, call)
    axis = int(call.attrs.axis) % len(out_shape)
    func = concat_parts_func(shapes, axis, str(call.ty.dtype))
    gvar = bb.add_func(func, "concatenate")
    return relax.call_tir(gvar, list(fields.fields), call.ty)


CONCAT_PARTS = {"relax.concat": _legalize}
