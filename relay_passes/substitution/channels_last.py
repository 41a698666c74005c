"""A kernel to be timed, rewritten channels-last: the layout the CPU build runs it in.

The CPU lowering (schedules.default_cpu_layout_passes) turns every conv into NHWC data / HWIO weights, and
the pools, concats, splits and elementwise ops between convs follow. A kernel cut out of the NCHW graph and
compiled alone would instead get transposes at its boundary (timed with it: a 1x1 conv of a 64x56x56 input
timed 218 us alone, 115 us in the model), or stay NCHW where it has no conv (a channel split is a contiguous
copy in NCHW, a strided one in NHWC: 18 us against 42 us in the model). Both errors favoured merging convs
that share an input. Only the timing matters here, so constants are transposed, not recomputed.
"""

from __future__ import annotations

import numpy as np

from . import ops
from .graph import Graph, Node

DATA = (0, 2, 3, 1)  # NCHW array -> NHWC
WEIGHT = (2, 3, 1, 0)  # OIHW -> HWIO
AXIS = {0: 0, 1: 3, 2: 1, 3: 2, -1: 2, -2: 1, -3: 3, -4: 0}  # an NCHW axis -> the same axis in NHWC
NHWC_CONV = {"data_layout": "NHWC", "kernel_layout": "HWIO", "out_layout": "NHWC"}
POOL = ("relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d")


def _axis_attrs(attrs: dict) -> dict:
    axis = attrs.get("axis")
    if axis is None:
        return dict(attrs)
    moved = AXIS[axis] if isinstance(axis, int) else tuple(AXIS[a] for a in axis)
    return {**attrs, "axis": moved}


# op -> its attrs for channels-last data; a kernel with an op not listed is timed as it is (NCHW). The convs
# are edgeq.conv2d here: the substitution graph lifts every conv into it.
ATTRS = {
    "edgeq.conv2d": lambda attrs: {**attrs, **NHWC_CONV},
    **{op: lambda attrs: {**attrs, "layout": "NHWC", "out_layout": "NHWC"} for op in POOL},
    **{op: _axis_attrs for op in ("relax.concat", "relax.split", "relax.mean", "relax.sum", "relax.max")},
    **{op: dict for op in ops.ELEMENTWISE},
}


def channels_last(g: Graph) -> Graph:
    """`g` (one kernel: inputs, constants, its ops) with its 4-D tensors NHWC; `g` itself when one of its ops
    has no channels-last form here, it has no 4-D tensor, or an operand of another rank (a [W] vector
    broadcast along NCHW's last axis would broadcast along the channels)."""
    leaves = [g.nodes[i] for i in g.topo() if g.nodes[i].op in ("input", "const")]
    if (any(g.nodes[i].op not in ATTRS for i in g.op_ids()) or not any(_is_4d(n) for n in leaves)
            or any(not _is_4d(n) and _elements(n) > 1 for n in leaves)):
        return g
    from tvm import relax

    out = Graph(func_attrs=None)
    new: dict[int, int] = {}
    for nid in g.topo():
        node = g.nodes[nid]
        inputs = [new[i] for i in node.inputs]
        if node.op == "input":
            ty = relax.TensorType([node.shape[a] for a in DATA], node.dtype) if _is_4d(node) else node.ty
            new[nid] = out.add(Node("input", ty=ty, value=relax.Var(node.value.name, ty)))
            out.params.append(new[nid])
        elif node.op == "const":
            new[nid] = out.const(_transposed(g, nid)) if _is_4d(node) else out.add(node)
        elif node.op == "literal":
            new[nid] = out.add(node)
        elif node.op == "tuple":
            new[nid] = out.op("tuple", inputs)
        elif node.op == "get_item":
            new[nid] = out.op("get_item", inputs, index=node.attrs["index"])
        else:
            new[nid] = out.op(node.op, inputs, **ATTRS[node.op](node.attrs))
    out.output = new[g.output]
    return out


def _elements(node: Node) -> int:
    shape = getattr(node.ty, "shape", None)
    return int(np.prod([int(d) for d in shape.values])) if shape is not None and hasattr(shape, "values") else 2


def _is_4d(node: Node) -> bool:
    shape = getattr(node.ty, "shape", None)
    return shape is not None and hasattr(shape, "values") and len(shape.values) == 4


def _transposed(g: Graph, nid: int) -> np.ndarray:
    """A 4-D constant channels-last: HWIO where a conv reads it as weights, NHWC otherwise."""
    weight = any(g.nodes[u].op == "edgeq.conv2d" and g.nodes[u].inputs[1] == nid for u in g.users()[nid])
    return np.transpose(g.nodes[nid].value, WEIGHT if weight else DATA)
