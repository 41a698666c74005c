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


def simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its static shape arithmetic and constant subgraphs folded; same inputs and outputs."""
    import onnxslim

    names = [o.name for o in proto.graph.output]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # onnxslim prints a summary table when asked to
            slimmed = onnxslim.slim(proto, skip_optimizations=["graph_fusion"])
    except Exception as e:  # onnxslim raises whatever its folding hit: report it as the model's problem
        raise EdgeqError(f"folding the model's constant subgraphs failed: {one_line(e)}") from None
    if slimmed is None or [o.name for o in slimmed.graph.output] != names:
        raise EdgeqError("folding the model's constant subgraphs changed its outputs; "
                         "this is a bug in the folding, please report the model")
    _keep_inputs(proto, slimmed)
    return slimmed


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

