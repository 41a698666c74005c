"""Give the ONNX importer's Clip back to Relax as maximum / minimum ops, so it fuses into the conv before it.

TVM's Relax ONNX frontend emits Clip (ReLU6, ...) as `call_tir` to `topi.maximum` / `topi.minimum` PrimFuncs.
Relax passes cannot look inside a call_tir: ConvertLayout wrapped each one in NHWC->NCHW->NHWC transposes and
FuseOps kept it out of the conv's epilogue, so every ReLU6 of MobileNetV2 ran as its own
transpose-clip-transpose kernel over the whole activation (measured: a sixth of the fp32 model's time).
A call is rewritten only when its PrimFunc is exactly what `topi.maximum` / `topi.minimum` builds for those
operand shapes (structural equality), and its bound is a constant.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, te, topi
from tvm.ir.expr import Constant
from tvm.relax.expr_functor import PyExprMutator, mutator

_OPS = {"maximum": (topi.maximum, relax.op.maximum), "minimum": (topi.minimum, relax.op.minimum)}


def _is_topi(func, name: str, args) -> bool:
    """Whether `func` is topi.<name> of two tensors with the shapes and dtypes of `args`."""
    try:
        placeholders = [te.placeholder(list(a.ty.shape.values), a.ty.dtype, name=f"t{i}") for i, a in enumerate(args)]
    except (TypeError, AttributeError):  # an operand without a known tensor shape
        return False
    expected = te.create_prim_func([*placeholders, _OPS[name][0](*placeholders)])
    same_name = {"global_symbol": "f"}  # the frontend's PrimFunc is private (no symbol)
    return tvm_ffi.structural_equal(func.with_attrs(same_name), expected.with_attrs(same_name), map_free_vars=True)


@mutator
class _ClipToOps(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.mod_ = mod

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.call_tir") or not isinstance(call.args[1], relax.Tuple):
            return call
        gvar, args = call.args[0], list(call.args[1].fields)
        name = gvar.name_hint.rstrip("0123456789")
        if (name in _OPS and len(args) == 2 and isinstance(args[1], Constant)
                and _is_topi(self.mod_[gvar], name, args)):
            return _OPS[name][1](args[0], args[1])
        return call


@tvm.transform.module_pass(opt_level=0, name="EdgeqClipToOps")
def clip_to_ops(mod, _ctx):
    """Module pass: the frontend's call_tir maximum/minimum by a constant become relax.maximum/minimum."""
    updates = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            updates[gvar] = _ClipToOps(mod).visit_expr(func)
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod
