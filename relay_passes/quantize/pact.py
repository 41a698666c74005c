"""PACT: parameterized clipping activation (Choi et al.) for low-bit unsigned activations.

    y   = clip(x, 0, alpha) = 0.5 * (|x| - |x - alpha| + alpha)
    y_q = round(y * (2^k - 1) / alpha) * alpha / (2^k - 1)

so a k-bit activation is the unsigned code round(y * (2^k - 1) / alpha) in 0..2^k-1 with scale alpha / (2^k - 1)
and zero point 0 (real 0.0 is code 0: ReLU zeros and zero padding are exact).

Post-training alpha: :class:`~.observers.PACTObserver` picks, on the same bounded :class:`~.observers.Histogram` the 8-bit
observers use, the alpha minimizing clipping + quantization squared error (the trade-off of the paper's
Fig. 4a).  A QAT-exported model carries its learned alpha: :func:`find_pact_clips` reads it from the ONNX
pattern Clip(0, alpha) (or Relu -> Min(alpha)) followed by a QuantizeLinear/DequantizeLinear fake quant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper



def clip(x, alpha):
    """PACT's clip written as in the paper: 0.5 * (|x| - |x - alpha| + alpha) == clip(x, 0, alpha)."""
    x = np.asarray(x, np.float64)
    return 0.5 * (np.abs(x) - np.abs(x - alpha) + alpha)


def quantize(x, alpha: float, bits: int) -> np.ndarray:
    """k-bit unsigned codes round(clip(x, 0, alpha) * (2^k - 1) / alpha) (uint8 for k <= 8; round half even)."""
    steps = check_bits(bits)
    return np.round(clip(x, alpha) * (steps / alpha)).astype(np.uint8 if bits <= 8 else np.uint16)


def dequantize(codes, alpha: float, bits: int) -> np.ndarray:
    return (np.asarray(codes, np.float64) * (alpha / check_bits(bits))).astype(np.float32)


def fake_quantize(x, alpha: float, bits: int) -> np.ndarray:
    """y_q of the paper, as floats (for comparison only; kernels use the codes)."""
    return dequantize(quantize(x, alpha, bits), alpha, bits)


def scale(alpha: float, bits: int) -> float:
    """Real value of one code step."""
    return float(alpha) / check_bits(bits)


def check_bits(bits: int) -> int:
    """2^bits - 1, the largest code; ValueError for a bit width PACT does not take."""
    if not 1 <= int(bits) <= 16:
        raise ValueError(f"PACT bit width must be 1..16, got {bits}")
    return 2 ** int(bits) - 1


# ---------------------------------------------------------------------------------------------- calibration
def histogram_mse(histogram, alphas: np.ndarray, bits: int) -> np.ndarray:
    """Expected squared error of PACT-quantizing the histogram's data with each alpha in ``alphas``.

    Each bin's values are taken at the bin centre, plus width^2/12 for their spread inside the bin when they
    are not exactly representable; exact zeros (ReLU) cost nothing.  Values below 0 clip to 0, values above
    alpha to alpha, values in between round to the nearest of the 2^k levels.
    """
    view, z, width = histogram.zero_view()
    counts = view.astype(np.float64)
    zeros = float(histogram.zeros)
    counts[z] -= zeros
    keep = counts > 0
    centres = ((np.arange(counts.size) - z + 0.5) * width)[keep]
    counts = counts[keep]
    steps = check_bits(bits)
    errors = np.empty(len(alphas))
    for start in range(0, len(alphas), 128):  # [candidates, bins] blocks bound the memory
        a = np.asarray(alphas[start:start + 128], np.float64)[:, None]
        y = np.clip(centres[None], 0.0, a)
        q = np.round(y * steps / a) * a / steps
        errors[start:start + 128] = (counts * ((q - centres) ** 2 + width**2 / 12)).sum(axis=1)
    return errors


def optimal_alpha(histogram, bits: int) -> float:
    """The alpha minimizing clipping + quantization error over the histogram: every bin edge above 0."""
    if histogram.total == 0:
        raise ValueError("no finite values observed: update() the observer with calibration data first")
    if histogram.width == 0.0 or histogram.max <= 0.0:
        return max(histogram.max, 0.0) or 1.0  # constant (or non-positive) data: any alpha >= max is exact
    view, z, width = histogram.zero_view()
    top = int(np.flatnonzero(view)[-1]) + 1 - z  # bins from 0 to the end of the data
    candidates = np.arange(1, top + 1) * width
    errors = histogram_mse(histogram, candidates, bits)
    return float(min(candidates[int(np.argmin(errors))], histogram.max))


# ---------------------------------------------------------------------------------------------- QAT models
@dataclass(frozen=True)
class PACTClip:
    """A PACT activation found in an ONNX graph: clip of ``input`` to [0, alpha], fake-quantized to ``bits``."""

    input: str
    output: str  # the DequantizeLinear output (the quantized activation)
    alpha: float
    bits: int | None  # None when the QDQ scale is not alpha / (2^k - 1) for an integer k
    nodes: tuple[str, ...]  # names of the nodes of the pattern, in order


def find_pact_clips(model: onnx.ModelProto) -> list[PACTClip]:
    """PACT activations of a QAT-exported model: Clip(x, 0, alpha) or Min(Relu(x), alpha) (either order of Min's
    inputs), followed by QuantizeLinear -> DequantizeLinear with zero point 0.  Returns alpha and the bit width
    implied by the fake-quant scale (alpha / scale = 2^k - 1)."""
    graph = model.graph
    consts = _constants(graph)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producer = {out: node for node in graph.node for out in node.output}
    found = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        clipped = _pact_clip(producer.get(node.input[0]), producer, consts)
        if clipped is None:
            continue
        source, alpha, pattern = clipped
        dq = [c for c in consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"]
        zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        if not dq or node.input[1] not in consts or zp is None or np.any(zp != 0):
            continue
        qscale = float(np.asarray(consts[node.input[1]]).reshape(-1)[0])
        steps = alpha / qscale
        k = math.log2(round(steps) + 1) if round(steps) > 0 else 0.0
        bits = int(k) if abs(steps - round(steps)) < 1e-3 and k == int(k) and k >= 1 else None
        found.append(PACTClip(source, dq[0].output[0], alpha, bits, tuple(n.name for n in pattern + [node, dq[0]])))
    return found


def _pact_clip(node, producer, consts):
    """(input, alpha, nodes) when ``node`` computes clip(input, 0, alpha), else None."""
    if node is None:
        return None
    if node.op_type == "Clip":
        if len(node.input) > 1 or any(a.name in ("min", "max") for a in node.attribute):
            lo = _clip_bound(node, 1, "min", consts)
            hi = _clip_bound(node, 2, "max", consts)
            if lo is not None and hi is not None and lo == 0.0 and hi > 0.0:
                return node.input[0], hi, [node]
        return None
    if node.op_type == "Min" and len(node.input) == 2:
        for i in (0, 1):
            other = node.input[1 - i]
            relu = producer.get(node.input[i])
            if other in consts and np.size(consts[other]) == 1 and relu is not None and relu.op_type == "Relu":
                alpha = float(np.asarray(consts[other]).reshape(-1)[0])
                if alpha > 0.0:
                    return relu.input[0], alpha, [relu, node]
    return None


def _clip_bound(node, index, attr, consts):
    for a in node.attribute:  # opset < 11: attributes
        if a.name == attr:
            return float(a.f)
    if len(node.input) > index and node.input[index] in consts:
        return float(np.asarray(consts[node.input[index]]).reshape(-1)[0])
    return None


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
    return values
