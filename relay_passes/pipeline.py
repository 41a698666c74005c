"""The ordered graph-level passes run on every imported model before lowering.

Later stages (quantization, relaxed substitution) are inserted here as entries of GRAPH_PASSES-like lists;
each pass takes and returns a Relax IRModule and never prints.
"""

from __future__ import annotations

from tvm import relax, transform

from .clip_ops import clip_to_ops


def inference_passes() -> list[transform.Pass]:
    """Simplify for inference: batch norm decomposed to scale/shift and folded into constants; the importer's
    Clip made visible to layout conversion and fusion again."""
    return [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.FoldConstant(),
        clip_to_ops,
        relax.transform.DeadCodeElimination(),
    ]


def optimize(mod):
    """Run the graph passes in order."""
    return transform.Sequential(inference_passes(), name="edgeq_graph")(mod)
