"""Constant folding in numpy for the ops an imported model computes on its weights.

TVM's FoldConstant evaluates every call on constants by legalizing it and compiling it with LLVM, one call at
a time (~15-25 ms each).  An imported model has hundreds: each BatchNormalization's sqrt/divide/multiply
chain, the Clip importer's isnan/where on its bounds, the Gather importer's index normalization (from the static shape_of its data), the reshape of every conv bias, the weight transposes
of the NHWC conversion (MobileNetV2: 14 s of a 27 s build).  The elementwise and layout ops among them are
evaluated here with numpy (IEEE float32 like the compiled code, so the constants are the same); whatever is
left goes to FoldConstant as before.  The default schedule's compile-time weight repacks (``call_tir`` of a
scheduled PrimFunc on a constant) are evaluated by :func:`fold_constant_tir_calls` in one LLVM build.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant


def _float_only(fn):
    return lambda call, *args: fn(*args) if all(np.issubdtype(a.dtype, np.floating) for a in args) else None


def _reshape(call, x, shape):
    return x.reshape(shape)


def _permute_dims(call, x):
    axes = call.attrs.axes
    return np.transpose(x, None if axes is None else [int(a) for a in axes])


def _expand_dims(call, x):
    return np.expand_dims(x, tuple(int(a) for a in call.attrs.axis))


def _squeeze(call, x):
    axis = call.attrs.axis
    return np.squeeze(x, None if axis is None else tuple(int(a) for a in axis))


def _astype(call, x):
    dtype = np.dtype(str(call.attrs.dtype))
    return x.astype(dtype) if np.issubdtype(dtype, np.floating) or x.dtype.kind in "biu" else None


def _take(call, x, indices):
    axis = None if call.attrs.axis is None else int(call.attrs.axis)
    mode = {"clip": "clip", "wrap": "wrap"}.get(str(call.attrs.mode), "raise")
    try:
        return np.take(x, indices, axis=axis, mode=mode)
    except IndexError:  # "fast" mode out of range: left to the compiled code
        return None


FOLDS = {
    "relax.add": lambda call, a, b: np.add(a, b),
    "relax.subtract": lambda call, a, b: np.subtract(a, b),
    "relax.multiply": lambda call, a, b: np.multiply(a, b),
    "relax.divide": _float_only(np.divide),
    "relax.sqrt": _float_only(np.sqrt),
    "relax.negative": lambda call, a: np.negative(a),
    "relax.isnan": lambda call, a: np.isnan(a),
    "relax.where": lambda call, c, a, b: np.where(c, a, b),
    # the Gather importer's index normalization (where(i < 0, i + n, i)) and the weight slices it takes
    "relax.less": lambda call, a, b: np.less(a, b),
    "relax.greater_equal": lambda call, a, b: np.greater_equal(a, b),
    "relax.take": _take,
    "relax.shape_to_tensor": lambda call, shape: np.array(shape, np.int64),
    "relax.reshape": _reshape,
    "relax.permute_dims": _permute_dims,
    "relax.expand_dims": _expand_dims,
    "relax.squeeze": _squeeze,
    "relax.astype": _astype,
}


@relax.expr_functor.mutator
class _NumpyFolder(relax.PyExprMutator):
    def visit_call_(self, call):  # pylint: disable=arguments-renamed
        call = self.visit_expr_post_order(call)
        name = getattr(call.op, "name", "")
        if name == "relax.shape_of":  # of a statically shaped tensor: its shape, for shape_to_tensor to fold
            shape = getattr(call.args[0].ty, "shape", None)
            values = getattr(shape, "values", None)
            if values is not None and all(isinstance(v, tvm.tirx.IntImm) for v in values):
                return relax.ShapeExpr([int(v) for v in values])
            return call
        fold = FOLDS.get(name)
        ty = call.ty
        if fold is None or not isinstance(ty, relax.TensorType) or ty.shape is None:
            return call
        args = [self._value(a) for a in call.args]
        if any(a is None for a in args):
            return call
        with np.errstate(all="ignore"):
            value = fold(call, *args)
        shape = tuple(int(d) for d in ty.shape.values)
        if value is None or np.shape(value) != shape:
            return call
        return relax.const(np.array(value, dtype=str(ty.dtype), order="C"), str(ty.dtype))  # keeps 0-d shapes

    def _value(self, arg):
        """The numpy value of a constant argument (directly, through a binding, or a scalar PrimValue), a static
        shape, else None."""
        if isinstance(arg, relax.Var):
            arg = self.lookup_binding(arg)
        if isinstance(arg, relax.ShapeExpr):
            values = arg.values
            return tuple(int(v) for v in values) if all(isinstance(v, tvm.tirx.IntImm) for v in values) else None
        if not isinstance(arg, Constant):
            return None
        if hasattr(arg.value, "numpy"):
            return arg.value.numpy()
        dtype = getattr(arg.ty, "dtype", None)  # a scalar immediate such as BatchNormalization's epsilon
        return np.array(arg.value, dtype=str(dtype)) if dtype is not None and isinstance(arg.value, (int, float)) else None


@tvm.transform.module_pass(opt_level=0, name="FoldConstantsInNumpy")
def fold_constants(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Evaluate FOLDS calls whose arguments are constants; run TVM's FoldConstant after it for the rest."""
    folded = mod.clone()  # IRModule item assignment works in place: leave the caller's module alone
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            folded[gvar] = _NumpyFolder(mod).visit_expr(func)
    return folded


@relax.expr_functor.mutator
class _ConstantCalls(relax.PyExprMutator):
    """Replaces each ``call_tir`` on constants with its precomputed value (``values``: binding var -> array)."""

    def __init__(self, mod, values):
        super().__init__(mod)
        self.values = values

    def visit_var_binding_(self, binding):
        value = self.values.get(binding.var)
        if value is None:
            super().visit_var_binding_(binding)
            return
        const = relax.const(value, str(value.dtype))
        self.set_var_remap(binding.var, self.builder_.emit(const, binding.var.name))


_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _constant_tir_calls(func: relax.Function) -> list:
    """(binding var, PrimFunc global var, argument arrays, output type) of each call_tir on constants only."""
    found = []
    for block in getattr(func.body, "blocks", []):
        for binding in block.bindings:
            call = getattr(binding, "value", None)
            if not isinstance(call, relax.Call) or not call.op.same_as(_CALL_TIR):
                continue
            args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else [call.args[1]]
            ty = call.ty
            if (len(call.args) == 2 and args and all(isinstance(a, Constant) and hasattr(a.value, "numpy") for a in args)
                    and isinstance(ty, relax.TensorType) and ty.shape is not None):
                found.append((binding.var, call.args[0], [a.value.numpy() for a in args], ty))
    return found


@tvm.transform.module_pass(opt_level=0, name="FoldConstantTIRCalls")
def fold_constant_tir_calls(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Evaluate every ``call_tir`` whose arguments are all constants (the weight repacks of the default
    schedule) with ONE LLVM build of their PrimFuncs on the build machine; FoldConstant builds each alone."""
    work = {gvar: _constant_tir_calls(func) for gvar, func in mod.functions.items() if isinstance(func, relax.Function)}
    prims = {callee.name_hint: mod[callee] for calls in work.values() for _, callee, _, _ in calls}
    if not prims:
        return mod
    lib = tvm.tirx.build(tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in prims.items()}),
                         target=tvm.target.Target({"kind": "llvm"}))
    dev = tvm.cpu()
    folded = mod.clone()
    for gvar, calls in work.items():
        values = {}
        for var, callee, args, ty in calls:
            out = tvm.runtime.empty([int(d) for d in ty.shape.values], str(ty.dtype), dev)
            lib[callee.name_hint](*[tvm.runtime.tensor(a, dev) for a in args], out)
            values[var] = out.numpy()
        if values:
            folded[gvar] = _ConstantCalls(mod, values).visit_expr(mod[gvar])
    return folded
