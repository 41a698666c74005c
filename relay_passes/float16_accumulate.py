"""float16 matmuls and convolutions accumulate in float32, then round once to float16.

TVM computes a float16 matmul with a float16 accumulator: every partial sum rounds to 11 bits, and a dot
product of 64 terms ends several float16 steps away from the exact result (ONNX's Attention tests in float16:
up to 0.0015 off). onnxruntime and numpy accumulate float16 products in float32; so does edgeq.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

def _conv(op):
    def wide(call):
        a = call.attrs
        return op(*call.args, strides=a.strides, padding=a.padding, dilation=a.dilation, groups=a.groups,
                  data_layout=a.data_layout, kernel_layout=a.kernel_layout, out_layout=a.out_layout,
                  out_dtype="float32")

    return wide


# op -> the same call with a float32 result
_WIDE = {
    tvm.ir.Op.get("relax.matmul"): lambda call: relax.op.matmul(*call.args, out_dtype="float32"),
    tvm.ir.Op.get("relax.nn.conv1d"): _conv(relax.op.nn.conv1d),
    tvm.ir.Op.get("relax.nn.conv2d"): _conv(relax.op.nn.conv2d),
}


def _float16(expr) -> bool:
    return isinstance(expr.ty, relax.TensorType) and str(expr.ty.dtype) == "float16"


@mutator
class _Float16Accumulate(PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        wide = _WIDE.get(call.op)
        if wide is None or not (_float16(call) and all(_float16(a) for a in call.args)):
            return call
        return relax.op.astype(self.builder_.normalize(wide(call)), "float16")


@tvm.transform.module_pass(opt_level=0, name="EdgeqFloat16Accumulate")
def float16_accumulate(mod, _ctx):
    """Module pass: float16 matmul / conv with a float32 accumulator and one rounding at the end."""
    updates = {gvar: _Float16Accumulate(mod).visit_expr(func)
               for gvar, func in mod.functions.items() if isinstance(func, relax.Function)}
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod
