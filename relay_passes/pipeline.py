"""The ordered graph-level passes run on every imported model before lowering.

Later stages (quantization, relaxed substitution) are inserted here as entries of GRAPH_PASSES-like lists;
each pass takes and returns a Relax IRModule and never prints.
"""

from __future__ import annotations

from tvm import relax, transform

from schedules.fold_constants import fold_constants

from .clip_ops import clip_to_ops
from .conv_transpose import conv_transpose_as_conv
from .conv_valid_taps import conv_valid_taps
from .float16_accumulate import float16_accumulate
from .variadic_ops import variadic_as_pairwise


def inference_passes() -> list[transform.Pass]:
    """Simplify for inference: a batch norm after a conv folded into the conv's weights and a bias (any other
    decomposed to scale/shift constants); the importer's Clip made visible to layout conversion and fusion.

    Folding leaves the conv kernel one bias add instead of subtract/divide/multiply/add per output element
    (MobileNetV2 fp32 -6 %).  CanonicalizeBindings first unwraps the importer's ``(y, mean, var)[0]``.
    """
    return [
        variadic_as_pairwise,
        conv_transpose_as_conv,
        float16_accumulate,
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldBatchnormToConv2D(),
        relax.transform.DecomposeOpsForInference(),
        fold_constants,  # numpy: the BN and Clip-bound arithmetic, without an LLVM build per op
        relax.transform.FoldConstant(),
        conv_valid_taps,  # needs the folded kernels
        clip_to_ops,
        relax.transform.DeadCodeElimination(),
    ]


def optimize(mod):
    """Run the graph passes in order."""
    return transform.Sequential(inference_passes(), name="edgeq_graph")(mod)
