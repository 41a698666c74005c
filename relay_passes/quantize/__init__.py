"""8-bit quantization: prepare -> calibrate -> annotate (QDQ ONNX) -> realize (integer Relax kernels).

`quantize_onnx` turns an fp32 ONNX model plus calibration data into a QDQ ONNX model; `realize.realize` turns
the Relax import of any QDQ ONNX model (edgeq's, ONNX Runtime's, PyTorch's; QLinearConv/QLinearMatMul are
rewritten to QDQ first by `qlinear.to_qdq`) into a module whose quantized ops are integer kernels
(edgeq.compiler.realize_onnx runs the three steps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from .annotate import Plan, Policy
from .observers import METHODS

__all__ = ["METHODS", "Plan", "Policy", "QDQResult", "is_quantized", "quantize_onnx"]


@dataclass
class QDQResult:
    """A QDQ ONNX model and the plan and calibrated ranges that produced it."""

    model: onnx.ModelProto
    plan: Plan
    ranges: dict[str, tuple[float, float]]
    method: str
    policy: Policy


def quantize_onnx(model: onnx.ModelProto, make_run: Callable, batches: list[list[np.ndarray]],
                  method: str = "minmax", policy: Policy | None = None, progress: bool = False,
                  known: dict[tuple[str, int], tuple[float, float]] | None = None, **options) -> QDQResult:
    """Calibrate a shape-inferred fp32 model on `batches` (input lists) and return its QDQ form.

    ``make_run(model, tensors)`` gives the function that runs a batch through ``model`` (the prepared form of
    the given one) and returns {tensor: array} for the ``tensors`` to observe (edgeq: a host build with them as
    outputs); the pass itself compiles nothing.  ``known`` ({(tensor, bits): range}, bits 8 for the method's
    8-bit ranges, the PACT width otherwise) holds ranges calibrated before with the same data and method: only
    the missing ones are calibrated, and they are added to it (a policy search quantizes one model many ways).
    """
    from . import annotate, calibrate, prepare

    policy = policy or Policy()
    known = {} if known is None else known
    model = annotate.name_nodes(annotate.upgrade_opset(prepare.fold_batch_norm(model)))
    plan = annotate.plan(model, policy)
    widths = {name: 8 for name in plan.tensors} | {
        name: bits for name, (bits, source) in plan.low_bit.items() if source == name}
    missing = [name for name, bits in widths.items() if (name, bits) not in known]
    if missing:
        pact_tensors = {name: widths[name] for name in missing if widths[name] < 8}
        found = calibrate.calibrate(make_run(model, missing), missing, batches, method, policy.activation_dtype,
                                    progress=progress, low_bit=pact_tensors, **options)
        known.update({(name, widths[name]): found[name] for name in missing})
    ranges = {name: known[(name, bits)] for name, bits in widths.items()}
    for name, (_, source) in plan.low_bit.items():
        ranges[name] = ranges[source]  # a max pool keeps the codes and alpha of its input
    return QDQResult(annotate.insert_qdq(model, plan, ranges, policy), plan, ranges, method, policy)


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether a model is already quantized (QDQ or QOperator form): such models are realized as they are."""
    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)


QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "QGemm",
                 "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool")
