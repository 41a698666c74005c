"""User-facing quantization: `edgeq.quantize(model, calibration, method=..., mode=...)` -> a QDQ model to build.

Modes: "int8" (8-bit everywhere), and the low-bit modes of Choi et al. (SysML 2019): "w2a2", "w2a8", "w4a4" --
SAWB per-channel weights and PACT activations at those widths for the conv/dense layers, first and last
weighted layers kept 8-bit (``fpsc=True``: residual shortcuts too); edgeq.build compiles the low-bit layers to
bit-serial popcount kernels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import onnx

from .errors import EdgeqError
from .frontend import ImportedModel, load_onnx

LOW_BIT_MODES = {"w2a2": (2, 2), "w2a8": (2, 8), "w4a4": (4, 4)}  # mode -> (weight bits, activation bits)
AUTO = "auto"  # per-layer precision chosen by measurement under an accuracy budget (edgeq.policy)
MODES = ("int8", *LOW_BIT_MODES, AUTO)  # what `quantize(mode=...)` and edgeq.build(quantize=...) take


@dataclass
class QuantizedModel:
    """An fp32 model's QDQ form plus what produced it; `edgeq.build` compiles it into integer kernels."""

    source: ImportedModel  # the fp32 model as imported
    qdq: onnx.ModelProto
    method: str
    plan: object  # relay_passes.quantize.Plan
    ranges: dict[str, tuple[float, float]]
    per_channel: bool
    mode: str = "int8"
    fpsc: bool = False  # low-bit modes: residual shortcuts kept 8-bit
    policy: object = None  # mode "auto": the edgeq.policy.PolicyResult that chose each layer's precision

    def save(self, path: str | os.PathLike) -> None:
        """Write the QDQ model (runs in ONNX Runtime too, which makes a handy cross-check)."""
        from targets.atomic import write_atomic

        write_atomic(path, self.qdq.SerializeToString())

    def summary(self) -> dict:
        """The manifest's description of how the model was quantized."""
        low_bit = {name: bits for name, (bits, _) in self.plan.low_bit.items()}
        widths = ", ".join(str(b) for b in sorted(set(low_bit.values())))
        return {
            "mode": self.mode,
            **({"fpsc": self.fpsc} if self.mode != "int8" else {}),
            "source": "edgeq",
            "method": self.method,
            "activations": "8-bit per-tensor asymmetric (uint8 on x86, int8 on ARM)"
            + (f"; PACT {widths}-bit codes (zero point 0) into the low-bit layers" if low_bit else ""),
            "weights": f"int8 symmetric {'per-channel' if self.per_channel else 'per-tensor'}"
            + ("; SAWB per-channel low-bit weights in the low-bit layers" if self.mode != "int8" else ""),
            "quantized_layers": [{"node": g.node, "op": g.op_type, "output": g.output,
                                  **({"activation": g.activation} if g.activation else {}),
                                  **({"weight_bits": g.weight_bits} if g.weight_bits < 8 else {}),
                                  **({"output_bits": low_bit[g.output]} if g.output in low_bit else {})}
                                 for g in self.plan.groups],
            "float_layers": dict(self.plan.skipped),
            "ranges": {name: [float(lo), float(hi)] for name, (lo, hi) in self.ranges.items()},
            **({"policy": self.policy.summary()} if self.policy is not None else {}),
        }


def quantize(model, calibration, method: str = "minmax", exclude: tuple[str, ...] = (), per_channel: bool = True,
             input_shapes: dict | None = None, progress: bool = False, mode: str = "int8",
             keep_8bit: tuple[str, ...] = ("first", "last"), fpsc: bool = False, **options) -> QuantizedModel:
    """Calibrate an fp32 ONNX model (path, ModelProto or ImportedModel) and choose its quantized form.

    calibration: an .npz (keys = input names; samples stacked on axis 0), a directory of .npy/.npz batches, or an
    iterable of input dicts/arrays.  method: minmax, percentile (percentile=99.99), entropy or mse (PACT
    activations of low-bit modes always use PACT's MSE-optimal clip).  exclude: node names, op types, "first",
    "last" to keep in float.  mode: int8, w2a2, w2a8, w4a4; keep_8bit: layers of a low-bit mode kept 8-bit;
    fpsc: low-bit modes keep residual shortcuts 8-bit (shortcut convs, the tensors into and out of residual Adds).
    Per-layer precision chosen by measurement (mode "auto") is edgeq.policy.search, which builds on this.
    """
    from relay_passes.quantize import METHODS, Policy, is_quantized, quantize_onnx

    from .calibration import calibration_batches, tapped_runner

    if mode not in MODES:
        raise EdgeqError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if method not in METHODS:
        raise EdgeqError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    imported = model if isinstance(model, ImportedModel) else load_onnx(model, input_shapes)
    if mode == AUTO:  # above this module: edgeq.policy builds on QuantizedModel
        raise EdgeqError("mode 'auto' is a search over builds: edgeq.policy.search(model, calibration, eval_data, "
                         "...) or edgeq.build(model, quantize='auto', calibration=..., eval_data=...)")
    if is_quantized(imported.onnx_model):
        raise EdgeqError(f"{imported.name} is already quantized (it has QuantizeLinear/QLinear ops); "
                         "build it as it is, without --quantize")
    if fpsc and mode not in LOW_BIT_MODES:
        raise EdgeqError(f"fpsc (8-bit shortcuts) applies to the low-bit modes {', '.join(LOW_BIT_MODES)}, not {mode}")
    weight_bits, activation_bits = LOW_BIT_MODES.get(mode, (8, 8))
    policy = Policy(per_channel=per_channel, exclude=tuple(exclude), weight_bits=weight_bits,
                    activation_bits=activation_bits, keep_8bit=tuple(keep_8bit), fpsc=fpsc)
    batches = list(calibration_batches(calibration, imported.inputs))
    try:
        result = quantize_onnx(imported.onnx_model, lambda prepared, taps: tapped_runner(prepared, taps)[1], batches,
                               method, policy, progress=progress, **options)
    except ValueError as e:  # observer options
        raise EdgeqError(f"calibration: {e}") from None
    return QuantizedModel(imported, result.model, method, result.plan, result.ranges, per_channel, mode, fpsc)
