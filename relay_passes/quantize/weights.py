"""The int8 weights of a QDQ model, taken out of their DequantizeLinear so that import and constant folding see
ordinary float weights, and found again by content when realize builds the integer kernels."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import numpy_helper

from schedules import scheme


@dataclass(frozen=True)
class Weight:
    """An int8 weight taken out of a DequantizeLinear, with its per-channel (or scalar) scale."""

    values: np.ndarray  # int8, zero point 0
    scale: np.ndarray  # float32, () or (channels,)
    axis: int | None
    layer: str = ""  # the node that reads it (what the manifest names)


def weight_key(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array, np.float32)
    return hashlib.sha256(repr(array.shape).encode() + array.tobytes()).hexdigest()


def extract_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Weight]]:
    """Replace every DequantizeLinear of a constant int8 weight by its float value; keep the integers aside.

    The float initializer lets TVM's importer and constant folding work as usual; the realize pass finds the
    integers again by content (a 2-D weight is also registered transposed, as Gemm(transB=1) imports it).
    uint8 weights with zero point 128 are shifted to int8; other asymmetric weights stay float.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    table: dict[str, Weight] = {}
    replaced = []
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, node.name)
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not all(i in inits for i in node.input if i):
            continue
        values = numpy_helper.to_array(inits[node.input[0]])
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zero = (numpy_helper.to_array(inits[node.input[2]]).astype(np.int32)
                if len(node.input) > 2 and node.input[2] else np.zeros(scale.shape, np.int32))
        if values.dtype not in (np.int8, np.uint8) or values.ndim < 2:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % values.ndim if scale.ndim else None
        shifted = values.astype(np.int32) - zero.reshape(_axis_shape(values.ndim, axis))
        if not np.all(zero == (128 if values.dtype == np.uint8 else 0)) or shifted.min() < -128:
            continue
        weight = Weight(shifted.astype(np.int8), scale, axis, readers.get(node.output[0], node.output[0]))
        real = scheme.dequantize(weight.values, scheme.QParams(scale, np.zeros(scale.shape, np.int32), "int8", axis))
        table[weight_key(real)] = weight
        if real.ndim == 2:
            table[weight_key(real.T)] = replace(weight, values=weight.values.T.copy(),
                                          axis=None if axis is None else 1 - axis)
        graph.initializer.append(numpy_helper.from_array(real, node.output[0]))
        replaced.append(node)
    for node in replaced:
        graph.node.remove(node)
    return model, table


def _axis_shape(ndim: int, axis: int | None) -> list[int]:
    """Shape that broadcasts per-channel parameters along ``axis`` (all ones when per tensor)."""
    shape = [1] * ndim
    if axis is not None:
        shape[axis] = -1
    return shape
