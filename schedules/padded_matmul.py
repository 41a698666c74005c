"""Float matmuls whose output width has no vector-sized divisor, computed on a width padded to whole vectors.

ViT's attention scores ``q @ k^T`` are [12, 197, 64] x [12, 64, 197]: 197 tokens are prime, so the default
schedule finds no lane count dividing the output's innermost axis and leaves the kernel scalar (ViT-B/16 fp32:
60 of 147 ms in these 12 matmuls, for 2 % of the MACs). Here the right operand gets zero columns up to a
multiple of ``PAD_TO`` and the result is sliced back: the padded columns cost 208/197 of the MACs and the
kernel vectorizes and register-tiles like any other. (Rows need nothing: the row tile takes a predicated last
tile, dot_product.row_tile.)

`PADDED_MATMUL` is a LegalizeOps entry for relax.matmul: static float matmuls of at least 2-D operands whose
output width >= PAD_TO has no power-of-two divisor >= 4; every other matmul keeps TVM's legalization.
"""

from __future__ import annotations

import tvm
from tvm import relax, topi

_TVM_MATMUL = tvm.ir.Op.get("relax.matmul").get_attr("FLegalize")
PAD_TO = 16  # fp32 lanes of an AVX-512 register; four NEON registers


def _padding(call: relax.Call) -> int:
    """Zero columns to add to the right operand (0: keep TVM's matmul)."""
    a, b = call.args
    types = (a.ty, b.ty, call.ty)
    if not all(isinstance(t, relax.TensorType) and t.shape is not None and "float" in str(t.dtype) for t in types):
        return 0
    if len(a.ty.shape.values) < 2 or len(b.ty.shape.values) < 2:
        return 0
    width = b.ty.shape.values[-1]
    if not isinstance(width, tvm.tirx.IntImm) or int(width) < PAD_TO or int(width) % 4 == 0:
        return 0
    return -int(width) % PAD_TO


def _legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    pad = _padding(call)
    if not pad:
        return _TVM_MATMUL(bb, call)
    a, b = call.args
    rank = len(b.ty.shape.values)
    padded = bb.emit(bb.call_te(topi.nn.pad, b, [0] * rank, [0] * (rank - 1) + [pad], primfunc_name_hint="pad"))
    wide = bb.emit(_TVM_MATMUL(bb, bb.normalize(relax.op.matmul(a, padded, out_dtype=str(call.ty.dtype)))))
    width = int(b.ty.shape.values[-1])
    out_rank = len(call.ty.shape.values)
    return bb.call_te(topi.strided_slice, wide, [0] * out_rank, [int(v) for v in call.ty.shape.values[:-1]] + [width],
                      primfunc_name_hint="slice")


PADDED_MATMUL = {"relax.matmul": _legalize}
