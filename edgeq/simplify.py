"""Fold an ONNX model's shape arithmetic and constant subgraphs once its input shapes are fixed.

Exporters compute shapes at run time: Ultralytics builds its anchors with Shape -> Gather -> Range -> Concat,
torch's tracer writes ``x.view(n, g, c // g, h, w)`` as Shape/Gather/Div/Concat -> Reshape, old model-zoo files
fill their weights with ConstantOfShape. TVM's importer leaves such shapes symbolic, and a symbolic shape
stops the build ("no static tensor shape", "emit_te now only supports Tensor that has ShapeExpr shape").

onnxslim does this folding (constant folding with its own symbolic shape inference, dead-node and
common-subexpression elimination; it evaluates the folded subgraphs with onnxruntime, hence that dependency)
and is chosen over onnxsim because it is pure Python on top of onnx (no compiled extension to build per
platform) and never folds QuantizeLinear/DequantizeLinear, so QDQ models keep their quantization. Its pattern fusions (Conv+BatchNormalization, ...) are left off: they rename
the nodes they fuse, and users name nodes (--exclude) as their model has them; edgeq's own passes fuse those.
"""

from __future__ import annotations

import contextlib
import io

import onnx

from .errors import EdgeqError, one_line


MAX_ROUNDS = 3  # onnxslim, then ONNX shape inference: one extra round has sufficed on every model tried


def simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its static shape arithmetic and constant subgraphs folded; same inputs and outputs."""
    names = [o.name for o in proto.graph.output]
    slimmed = proto
    for _ in range(MAX_ROUNDS):
        slimmed = _slim(slimmed)
        slimmed, again = _static_shapes_left(slimmed)
        if not again:
            break
    if [o.name for o in slimmed.graph.output] != names:
        raise EdgeqError("folding the model's constant subgraphs changed its outputs; "
                         "this is a bug in the folding, please report the model")
    _keep_inputs(proto, slimmed)
    return slimmed


def _slim(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # onnxslim prints a summary table when asked to
            slimmed = onnxslim.slim(proto, skip_optimizations=["graph_fusion"])
    except Exception as e:  # onnxslim raises whatever its folding hit: report it as the model's problem
        raise EdgeqError(f"folding the model's constant subgraphs failed: {one_line(e)}") from None
    if slimmed is None:
        raise EdgeqError("folding the model's constant subgraphs returned no model; "
                         "this is a bug in the folding, please report the model")
    return slimmed


def _static_shapes_left(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """The model with ONNX's own shape inference recorded, and whether a Shape/Size node still reads a tensor
    whose shape that inference knows: onnxslim's symbolic inference gives up on some chains that ONNX's resolves
    (torchvision's Swin-T: Shape of a Reshape it left as [unk, unk, unk], 7 such nodes, 63 nodes behind them),
    and another round folds them once the shapes are in the model."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 (the import's strict inference reports the model's problem by name)
        return proto, False
    static = {v.name for v in (*inferred.graph.value_info, *inferred.graph.input)
              if v.type.tensor_type.HasField("shape")
              and all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)}
    return inferred, any(n.op_type in ("Shape", "Size") and n.input[0] in static for n in inferred.graph.node)


def _keep_inputs(original: onnx.ModelProto, slimmed: onnx.ModelProto) -> None:
    """Give the slimmed graph back every runtime input of the original, in its order: onnxslim drops inputs the
    folding left unused (Reshape's shape when the output shape was declared, Dropout's ratio), and the compiled
    model's signature is the user's model's."""
    initializers = {t.name for t in original.graph.initializer}
    runtime = [i for i in original.graph.input if i.name not in initializers]
    kept = {i.name: i for i in slimmed.graph.input}
    others = [i for i in slimmed.graph.input if i.name not in {r.name for r in runtime}]
    inputs = [kept.get(i.name, i) for i in runtime] + others
    slimmed.graph.ClearField("input")
    slimmed.graph.input.extend(inputs)

