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
                  **options) -> QDQResult:
    """Calibrate a shape-inferred fp32 model on `batches` (input lists) and return its QDQ form.

    ``make_run(model, tensors)`` gives the function that runs a batch through ``model`` (the prepared form of
    the given one) and returns {tensor: array} for the ``tensors`` to observe (edgeq: a host build with them as
    outputs); the pass itself compiles nothing."""
    from . import annotate, calibrate, prepare

    policy = policy or Policy()
    model = annotate.name_nodes(annotate.upgrade_opset(prepare.fold_batch_norm(model)))
    plan = annotate.plan(model, policy)
    pact_tensors = {name: bits for name, (bits, source) in plan.low_bit.items() if source == name}
    ranges = calibrate.calibrate(make_run(model, plan.tensors), plan.tensors, batches, method,
                                 policy.activation_dtype, progress=progress, low_bit=pact_tensors,
                                 **options) if plan.tensors else {}
    for name, (_, source) in plan.low_bit.items():
        ranges[name] = ranges[source]  # a max pool keeps the codes and alpha of its input
    return QDQResult(annotate.insert_qdq(model, plan, ranges, policy), plan, ranges, method, policy)


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether a model is already quantized (QDQ or QOperator form): such models are realized as they are."""
    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)


QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "QGemm",
                 "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool")
