"""What a module stores for its weights, by precision, next to the fp32 bytes those parameters had.

The realize pass records every constant it gives a kernel (a precision label such as "int8" or "2-bit packed",
the layer, the fp32 bytes of the parameters the constant holds) in the module attribute ``ATTR``, keyed by
content.  `weights_by_precision` walks the constants the module really holds (after any later pass) and sums
them by that label, so the manifest reports what the compiled model keeps, not a formula.  Constants nobody
recorded (layers left in float, activation scales and zero points, a float model's weights) count under their
dtype, with 4 bytes an element as their fp32 size.
"""

from __future__ import annotations

import hashlib

import numpy as np

ATTR = "edgeq_weight_storage"  # constant key -> (label, layer, fp32 bytes)
LOOKUP = "8-bit lookup tables"  # elementwise islands tabulated over their input's codes (lookup.py)
REQUANTIZE = "int32 bias/requantize"  # a conv / dense epilogue: int32 bias, multiplier and shift per channel


def key(array: np.ndarray) -> str:
    """A constant's identity across passes: its dtype, shape and bytes."""
    array = np.ascontiguousarray(array)
    return hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest()


def constants(mod) -> list[np.ndarray]:
    """Every tensor constant of the module's Relax functions (one per constant object)."""
    from tvm import relax
    from tvm.ir.expr import GenericConst

    found: dict = {}

    def visit(expr):
        if isinstance(expr, GenericConst):
            found.setdefault(expr)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return [c.value.numpy() for c in found]


def weights_by_precision(mod) -> dict[str, dict]:
    """{label: {"bytes", "fp32_bytes", "layers"}} over the module's constants, largest first ("layers" where
    recorded)."""
    records = mod.attrs[ATTR] if mod.attrs is not None and ATTR in mod.attrs else {}
    totals: dict[str, dict] = {}
    for array in constants(mod):
        record = records.get(key(array)) or (array.dtype.name, "", array.size * 4)
        label, layer, fp32 = str(record[0]), str(record[1]), int(record[2])
        entry = totals.setdefault(label, {"bytes": 0, "fp32_bytes": 0, "layers": []})
        entry["bytes"] += array.nbytes
        entry["fp32_bytes"] += fp32
        if layer and layer not in entry["layers"]:
            entry["layers"].append(layer)
    for entry in totals.values():
        if not entry["layers"]:
            del entry["layers"]
    return dict(sorted(totals.items(), key=lambda item: -item[1]["bytes"]))
