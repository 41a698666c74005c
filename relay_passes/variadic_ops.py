"""Variadic Sum / Mean / Max / Min as pairwise binary ops.

TVM's ONNX importer emits them as ``reduce(stack(inputs, axis=0), axis=0)``: a tensor of one rank more than the
inputs, for which the CPU layout pass has no NHWC form ("Invalid SLayout: can't find S in source layout ABCDE";
ResNet-50 and ShuffleNet of the ONNX model zoo add their residuals with Sum). Pairwise binary ops compute the
same elementwise result (ONNX defines these ops with multidirectional broadcasting) and fuse into the conv before
them. (Dropout, the other such form, is removed before import: edgeq.simplify.)
"""

from __future__ import annotations

import functools

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

# reduce op over the stacked axis -> (pairwise op, whether the result is divided by the count)
_STACK_REDUCTIONS = {
    "relax.sum": (relax.op.add, False),
    "relax.mean": (relax.op.add, True),
    "relax.max": (relax.op.maximum, False),
    "relax.min": (relax.op.minimum, False),
}
_STACK = tvm.ir.Op.get("relax.stack")


def _bound_call(mutator_, expr, op):
    """The call to `op` that the (already visited) variable `expr` is bound to, or None."""
    if not isinstance(expr, relax.Var):
        return None
    value = mutator_.lookup_binding(expr)
    return value if isinstance(value, relax.Call) and value.op == op else None


def _reduces_stacked_axis(call: relax.Call) -> bool:
    axis = call.attrs.axis
    return axis is not None and len(axis) == 1 and int(axis[0]) == 0 and not call.attrs.keepdims


@mutator
class _VariadicAsPairwise(PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        rule = _STACK_REDUCTIONS.get(getattr(call.op, "name", None))
        if rule is None or not _reduces_stacked_axis(call):
            return call
        stack = _bound_call(self, call.args[0], _STACK)
        if stack is None or int(stack.attrs.axis) != 0 or not isinstance(stack.args[0], relax.Tuple):
            return call
        binary, divide = rule
        inputs = list(stack.args[0].fields)
        total = functools.reduce(lambda a, b: self.builder_.normalize(binary(a, b)), inputs)
        if divide:
            total = relax.op.divide(total, relax.const(len(inputs), call.ty.dtype))
        return total


@tvm.transform.module_pass(opt_level=0, name="EdgeqVariadicAsPairwise")
def variadic_as_pairwise(mod, _ctx):
    """Module pass: stack-and-reduce as pairwise ops."""
    updates = {gvar: _VariadicAsPairwise(mod).visit_expr(func)
               for gvar, func in mod.functions.items() if isinstance(func, relax.Function)}
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod
