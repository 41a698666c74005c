"""User-facing int8 quantization: `edgeq.quantize(model, calibration, method=...)` -> a QDQ model to build."""

from __future__ import annotations

import os
from dataclasses import dataclass

import onnx

from .errors import EdgeqError
from .frontend import ImportedModel, load_onnx

MODES = ("int8",)


@dataclass
class QuantizedModel:
    """An fp32 model's QDQ form plus what produced it; `edgeq.build` compiles it into integer kernels."""

    source: ImportedModel  # the fp32 model as imported
    qdq: onnx.ModelProto
    method: str
    plan: object  # relay_passes.quantize.Plan
    ranges: dict[str, tuple[float, float]]
    per_channel: bool

    def save(self, path: str | os.PathLike) -> None:
        """Write the QDQ model (runs in ONNX Runtime too, which makes a handy cross-check)."""
        from .artifact import write_bytes_atomic

        write_bytes_atomic(path, self.qdq.SerializeToString())

    def summary(self) -> dict:
        """The manifest's description of how the model was quantized."""
        return {
            "mode": "int8",
            "source": "edgeq",
            "method": self.method,
            "activations": "8-bit per-tensor asymmetric (uint8 on x86, int8 on ARM)",
            "weights": f"int8 symmetric {'per-channel' if self.per_channel else 'per-tensor'}",
            "quantized_layers": [{"node": g.node, "op": g.op_type, "output": g.output,
                                  **({"activation": g.activation} if g.activation else {})}
                                 for g in self.plan.groups],
            "float_layers": dict(self.plan.skipped),
            "ranges": {name: [float(lo), float(hi)] for name, (lo, hi) in self.ranges.items()},
        }


def quantize(model, calibration, method: str = "minmax", exclude: tuple[str, ...] = (), per_channel: bool = True,
             input_shapes: dict | None = None, progress: bool = False, **options) -> QuantizedModel:
    """Calibrate an fp32 ONNX model (path, ModelProto or ImportedModel) and choose its int8 form.

    calibration: an .npz (keys = input names; samples stacked on axis 0), a directory of .npy/.npz batches, or an
    iterable of input dicts/arrays.  method: minmax, percentile (percentile=99.99), entropy or mse.
    exclude: node names, op types, "first", "last" to keep in float.
    """
    from relay_passes.quantize import METHODS, Policy, is_quantized, quantize_onnx

    if method not in METHODS:
        raise EdgeqError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    imported = model if isinstance(model, ImportedModel) else load_onnx(model, input_shapes)
    if is_quantized(imported.onnx_model):
        raise EdgeqError(f"{imported.name} is already quantized (it has QuantizeLinear/QLinear ops); "
                         "build it as it is, without --quantize")
    policy = Policy(per_channel=per_channel, exclude=tuple(exclude))
    try:
        result = quantize_onnx(imported.onnx_model, calibration, method, policy, progress=progress, **options)
    except ValueError as e:  # observer options
        raise EdgeqError(f"calibration: {e}") from None
    return QuantizedModel(imported, result.model, method, result.plan, result.ranges, per_channel)
