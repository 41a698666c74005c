"""Reading Relax bindings: the op a call calls and the value of a constant (shared by realize and lookup)."""

from __future__ import annotations

import numpy as np


def op_name(value) -> str | None:
    """"relax.add" for a call of relax.add; None for anything else (a var, a constant, a call of a function)."""
    from tvm import relax

    if isinstance(value, relax.Call) and hasattr(value.op, "name"):
        return str(value.op.name)
    return None


def is_const(expr) -> bool:
    from tvm.ir.expr import Constant

    return isinstance(expr, Constant)


def const(expr) -> np.ndarray:
    return expr.value.numpy()
