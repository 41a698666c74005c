"""8-bit quantization: prepare -> calibrate -> annotate (QDQ ONNX) -> realize (integer Relax kernels).

`quantize_onnx` turns an fp32 ONNX model plus calibration data into a QDQ ONNX model; `realize_onnx` turns any
QDQ ONNX model (edgeq's, ONNX Runtime's, PyTorch's; QLinearConv/QLinearMatMul are rewritten to QDQ first) into
a Relax module whose quantized ops are integer kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from .annotate import Plan, Policy
from .observers import METHODS

__all__ = ["METHODS", "Plan", "Policy", "QDQResult", "is_quantized", "quantize_onnx", "realize_onnx"]


@dataclass
class QDQResult:
    """A QDQ ONNX model and the plan and calibrated ranges that produced it."""

    model: onnx.ModelProto
    plan: Plan
    ranges: dict[str, tuple[float, float]]
    method: str
    policy: Policy


def quantize_onnx(model: onnx.ModelProto, calibration, method: str = "minmax", policy: Policy | None = None,
                  progress: bool = False, **options) -> QDQResult:
    """Calibrate a shape-inferred fp32 model on `calibration` and return its QDQ form."""
    from . import annotate, calibrate, prepare

    policy = policy or Policy()
    model = annotate.name_nodes(annotate.upgrade_opset(prepare.fold_batch_norm(model)))
    plan = annotate.plan(model, policy)
    pact_tensors = {name: bits for name, (bits, source) in plan.low_bit.items() if source == name}
    ranges = calibrate.calibrate(model, plan.tensors, calibration, method, policy.activation_dtype,
                                 progress=progress, low_bit=pact_tensors, **options) if plan.tensors else {}
    for name, (_, source) in plan.low_bit.items():
        ranges[name] = ranges[source]  # a max pool keeps the codes and alpha of its input
    return QDQResult(annotate.insert_qdq(model, plan, ranges, policy), plan, ranges, method, policy)


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether a model is already quantized (QDQ or QOperator form): such models are realized as they are."""
    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)


QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "QGemm",
                 "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool")


def realize_onnx(model: onnx.ModelProto, dtype: str, target=None):
    """A Relax module computing a QDQ (or QLinear*) ONNX model with integer kernels, `dtype` activations.

    ``target`` (a tvm Target) picks the low-bit kernels: bit-serial where it has popcount, int8 otherwise;
    None assumes popcount."""
    from tvm import relax

    from edgeq.frontend import load_onnx

    from . import qlinear, realize

    float_weights, weights = realize.extract_weights(qlinear.to_qdq(model))
    mod = relax.transform.FoldConstant()(load_onnx(float_weights).mod)
    return realize.realize(mod, weights, dtype, target)
