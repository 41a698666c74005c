"""Prepare an fp32 ONNX graph for quantization: fold BatchNormalization into the Conv before it.

Quantization must see the weights the integer kernel will multiply by, so BN's per-channel scale goes into the
conv weight and its shift into the bias (as ONNX Runtime's pre-processing does), instead of surviving as a float
op between two integer ones.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def fold_batch_norm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Conv -> BatchNormalization (inference form, constant parameters, conv output used once) -> one Conv."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    producer = {out: node for node in graph.node for out in node.output}
    dropped = []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 and any(bn.output[1:]):
            continue
        conv = producer.get(bn.input[0])
        params = bn.input[1:5]
        if (conv is None or conv.op_type != "Conv" or conv.input[1] not in inits
                or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits)
                or not all(p in inits for p in params)
                or consumers.get(conv.output[0], 0) != 1 or conv.output[0] in outputs):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[p]).astype(np.float64) for p in params)
        weight = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        bias = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
                if len(conv.input) > 2 and conv.input[2] else np.zeros(weight.shape[0]))
        factor = gamma / np.sqrt(var + eps)
        new_weight = (weight * factor.reshape(-1, *[1] * (weight.ndim - 1))).astype(np.float32)
        new_bias = ((bias - mean) * factor + beta).astype(np.float32)
        w_name, b_name = f"{conv.name or conv.output[0]}.folded_weight", f"{conv.name or conv.output[0]}.folded_bias"
        graph.initializer.extend([numpy_helper.from_array(new_weight, w_name), numpy_helper.from_array(new_bias, b_name)])
        del conv.input[1:]
        conv.input.extend([w_name, b_name])
        conv.output[0] = bn.output[0]
        dropped.append(bn)
    for bn in dropped:
        graph.node.remove(bn)
    used = {name for node in graph.node for name in node.input}
    keep = [t for t in graph.initializer if t.name in used or t.name in outputs]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return model
