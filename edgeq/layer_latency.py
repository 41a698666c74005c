"""Each layer's latency at each precision, measured on this machine: the policy search's ``latency`` objective.

A layer is timed alone: a one-layer ONNX model (its node, weights and fused activation, the input shape it has
in the full model) is quantized at the precision and built by edgeq like any model, then benchmarked.  A 4-D
layer reads the output of a 1x1 depthwise conv + ReLU, so that its input can be a PACT tensor as it is behind a
ReLU in the full model (the w*a2/a4 kernels); the time of that prefix alone is measured once and subtracted.
Results are cached in a JSON file keyed by what the time depends on (the layer's op, attributes and shapes, the
precision, the host target, the edgeq version; not the weight values) and written after every measurement, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PREFIX = "prefix"  # the prefix conv's node name; "prefix:fp32" / "prefix:int8" time the prefix alone


def default_cache() -> Path:
    return Path(os.environ.get("EDGEQ_CACHE", Path.home() / ".cache" / "edgeq")) / "layer-latency.json"


def measure(imported, layers, precisions: dict[str, tuple[int, int]], cache: str | os.PathLike | None = None,
            threads: int | None = None, progress: bool = False) -> dict[str, dict[str, float]]:
    """{node: {precision: ms}} for every layer (anything with a ``node`` name) at each precision (name ->
    (weight bits, activation bits); (32, 32) is fp32, as in edgeq.policy.PRECISIONS), from the cache or
    measured now."""
    from tqdm import tqdm

    import targets
    from relay_passes.quantize import annotate, prepare

    cache = Path(cache) if cache is not None else default_cache()
    table = _load(cache)
    model = onnx.shape_inference.infer_shapes(
        annotate.name_nodes(annotate.upgrade_opset(prepare.fold_batch_norm(imported.onnx_model))))
    host = json.dumps(targets.resolve("host").target, sort_keys=True)
    result: dict[str, dict[str, float]] = {layer.node: {} for layer in layers}
    todo = []
    for layer in layers:
        sub = layer_model(model, layer.node)
        names = list(precisions)
        if sub.graph.node[0].name == PREFIX:
            names += [f"{PREFIX}:fp32", f"{PREFIX}:int8"]
        todo += [(layer, name, sub, _key(sub, name, host)) for name in names]
    for layer, name, sub, key in tqdm(todo, desc="layer latency", unit="build", disable=None if progress else True,
                                      leave=False):
        if key not in table:
            table[key] = _time(sub, name, precisions, layer.node, threads)
            _save(cache, table)
        result[layer.node][name] = table[key]
    for times in result.values():
        prefix = {p: times.pop(f"{PREFIX}:{p}", 0.0) for p in ("fp32", "int8")}
        for p in times:
            times[p] = max(times[p] - prefix["fp32" if p == "fp32" else "int8"], 0.0)
    return result


def layer_model(model: onnx.ModelProto, node_name: str) -> onnx.ModelProto:
    """A shape-inferred, named model's layer as a model of its own (with a ReLU'd prefix for 4-D inputs)."""
    from relay_passes.quantize.annotate import ACTIVATIONS

    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    shapes = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}
    inits = {t.name: t for t in graph.initializer}
    anchor = nodes[node_name]
    users = [n for n in graph.node if anchor.output[0] in n.input]
    chain = [anchor] + (users if len(users) == 1 and users[0].op_type in ACTIVATIONS else [])
    source = shapes[anchor.input[0]]
    dims = [d.dim_value for d in source.type.tensor_type.shape.dim]
    body, inputs = [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)]
    feed = "x"
    constants = [inits[i] for n in chain for i in n.input if i in inits]
    if len(dims) == 4:  # x -> 1x1 depthwise conv -> ReLU: the layer reads a ReLU output, as PACT needs
        ones = numpy_helper.from_array(np.ones((dims[1], 1, 1, 1), np.float32), "prefix.w")
        body += [helper.make_node("Conv", ["x", "prefix.w"], ["prefix.conv"], name=PREFIX, group=dims[1]),
                 helper.make_node("Relu", ["prefix.conv"], ["prefix.relu"], name="prefix.relu")]
        constants.append(ones)
        feed = "prefix.relu"
    for n in chain:
        copy = onnx.NodeProto.FromString(n.SerializeToString())
        copy.input[0] = feed if n is anchor else copy.input[0]
        body.append(copy)
    out = chain[-1].output[0]
    out_dims = [d.dim_value for d in shapes[out].type.tensor_type.shape.dim]
    sub = helper.make_graph(body, f"layer {node_name}", inputs,
                            [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_dims)], constants)
    return helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _prefix_only(sub: onnx.ModelProto) -> onnx.ModelProto:
    graph = sub.graph
    relu = graph.node[1]
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    body = helper.make_graph(list(graph.node[:2]), "prefix", list(graph.input),
                             [helper.make_tensor_value_info(relu.output[0], TensorProto.FLOAT, dims)],
                             [t for t in graph.initializer if t.name == "prefix.w"])
    return helper.make_model(body, opset_imports=list(sub.opset_import), ir_version=sub.ir_version)


def _time(sub: onnx.ModelProto, precision: str, precisions: dict, node: str, threads: int | None) -> float:
    """Build the one-layer model with ``node`` at ``precision`` ("prefix:fp32|int8": the prefix alone) and
    return its mean latency in ms."""
    from relay_passes.quantize import Policy, quantize_onnx

    from .calibration import calibration_batches, tapped_runner
    from .compiler import HostBuild
    from .frontend import load_onnx

    prefix = precision.startswith(PREFIX)
    precision = precision.split(":")[-1]
    imported = load_onnx(_prefix_only(sub) if prefix else sub)
    shape = imported.inputs[0].shape
    sample = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    qdq = None
    bits = {"fp32": (32, 32), "int8": (8, 8)}[precision] if prefix else precisions[precision]
    if bits[0] < 32:
        policy = Policy(keep_8bit=(), layer_bits={node: bits} if bits[0] < 8 else {})
        batches = list(calibration_batches([sample, -sample], imported.inputs))
        qdq = quantize_onnx(imported.onnx_model, lambda m, taps: tapped_runner(m, taps)[1], batches, "minmax",
                            policy).model
    return float(HostBuild(imported, qdq).latency_ms([sample], threads=threads))


def _key(sub: onnx.ModelProto, precision: str, host: str) -> str:
    """What a layer's time depends on: ops, attributes, shapes (not weight values), precision, target, version."""
    from .version import __version__

    graph = sub.graph
    parts = [__version__, host, precision,
             *(f"{n.op_type}{[str(a) for a in n.attribute]}" for n in graph.node),
             *(str(list(t.dims)) for t in graph.initializer),
             *(str(v.type) for v in (*graph.input, *graph.output))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _load(path: Path) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}  # no cache yet, or an unreadable one: measure again


def _save(path: Path, table: dict[str, float]) -> None:
    from targets.atomic import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(table, indent=1, sort_keys=True))
