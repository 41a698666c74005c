"""Convolutions that mostly read their zero padding, computed only over the kernel taps that read the image.

DeepLabV3's ASPP runs 3x3 convs with dilation 12, 24 and 36 on a 20x20 feature map (320x320 input, output
stride 16): at dilation 24 and 36 every off-centre tap falls in the padding for every output pixel, at 12 a
tap reaches the image for 8 of 20 outputs. The padded convolution multiplies all nine taps everywhere, 2.8x the
MACs that reach the image over the three convs (DeepLabV3-MobileNetV3 fp32 ran 2.15x slower than onnxruntime,
whose NCHWc kernel skips those taps, 60 % of it in these convs).

Along one spatial axis, output ``o`` reads input ``o * s + k * d - pad`` with tap ``k``; the taps inside the
image form one contiguous range, which changes only near the borders. The outputs split into runs with the same
range; a run of outputs times a run of columns is a region, and each region is an unpadded convolution of a
slice of the input with the slice of the kernel holding its taps. The regions are concatenated back.
Exact: the dropped taps multiply zeros. Applied to a conv with a constant kernel (after BN folding) when the
taps that read the image are at most ``MAX_USEFUL_SHARE`` of the MACs and the MACs saved pay for the extra
calls (``MIN_SAVED_MACS`` per region): an ordinary 3x3 conv with pad 1 keeps its padding, and so does a small
one on a 4x4 map (a third of its MACs read padding, but nine calls would cost more than they save).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant
from tvm.relax.expr_functor import PyExprMutator, mutator

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
MAX_USEFUL_SHARE = 0.75  # rewrite when at least a quarter of the MACs multiply padding
MAX_REGIONS = 9  # each region is a conv call and an input slice of its own
MIN_SAVED_MACS = 1 << 18  # per region: about a microsecond of one core's FMAs, the cost of a kernel call


def tap_runs(size: int, out_size: int, kernel: int, stride: int, dilation: int, pad_before: int):
    """[(first output, end output, first tap, end tap)]: consecutive outputs that read the same taps inside an
    axis of ``size`` (end exclusive); a run whose outputs read no input at all has first tap == end tap."""
    runs = []
    for o in range(out_size):
        start = o * stride - pad_before
        taps = [k for k in range(kernel) if 0 <= start + k * dilation < size]
        first, end = (taps[0], taps[-1] + 1) if taps else (0, 0)
        if runs and runs[-1][2:] == (first, end):
            runs[-1] = (runs[-1][0], o + 1, first, end)
        else:
            runs.append((o, o + 1, first, end))
    return runs


def _pays(rows, cols, kernel_rows: int, kernel_cols: int, macs_per_tap: int) -> bool:
    """Whether computing only the taps inside the image saves enough MACs (see the module docstring)."""
    useful = sum((r[1] - r[0]) * (r[3] - r[2]) for r in rows) * sum((c[1] - c[0]) * (c[3] - c[2]) for c in cols)
    total = (rows[-1][1] * kernel_rows) * (cols[-1][1] * kernel_cols)
    saved = (total - useful) * macs_per_tap
    return useful <= MAX_USEFUL_SHARE * total and saved >= MIN_SAVED_MACS * len(rows) * len(cols)


def _static_ints(expr) -> list[int] | None:
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not all(isinstance(v, tvm.tirx.IntImm) for v in shape.values):
        return None
    return [int(v) for v in shape.values]


@mutator
class _ConvValidTaps(PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op != _CONV2D:
            return call
        a = call.attrs
        x, weight = call.args
        x_shape, out_shape = _static_ints(x), _static_ints(call)
        constant = isinstance(weight, Constant) and hasattr(weight.value, "numpy")
        if (not constant or x_shape is None or out_shape is None
                or (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW")):
            return call
        w = weight.value.numpy()
        (sh, sw), (dh, dw) = [int(s) for s in a.strides], [int(d) for d in a.dilation]
        pt, pl = int(a.padding[0]), int(a.padding[1])
        rows = tap_runs(x_shape[2], out_shape[2], w.shape[2], sh, dh, pt)
        cols = tap_runs(x_shape[3], out_shape[3], w.shape[3], sw, dw, pl)
        if (len(rows) * len(cols) > MAX_REGIONS or any(r[2] == r[3] for r in rows + cols)
                or not _pays(rows, cols, w.shape[2], w.shape[3], macs_per_tap=w.shape[0] * w.shape[1])):
            return call
        bb = self.builder_
        out_dtype = str(call.ty.dtype)
        bands = []
        for y0, y1, ky0, ky1 in rows:
            tiles = []
            for x0, x1, kx0, kx1 in cols:
                top, left = y0 * sh + ky0 * dh - pt, x0 * sw + kx0 * dw - pl
                bottom = (y1 - 1) * sh + (ky1 - 1) * dh - pt + 1
                right = (x1 - 1) * sw + (kx1 - 1) * dw - pl + 1
                window = bb.normalize(relax.op.strided_slice(x, axes=[2, 3], begin=[top, left], end=[bottom, right]))
                taps = relax.const(np.ascontiguousarray(w[:, :, ky0:ky1, kx0:kx1]))
                tiles.append(bb.normalize(relax.op.nn.conv2d(
                    window, taps, strides=(sh, sw), padding=0, dilation=(dh, dw), groups=int(a.groups),
                    out_dtype=out_dtype)))
            bands.append(tiles[0] if len(tiles) == 1 else bb.normalize(relax.op.concat(tiles, axis=3)))
        return bands[0] if len(bands) == 1 else relax.op.concat(bands, axis=2)


@tvm.transform.module_pass(opt_level=0, name="EdgeqConvValidTaps")
def conv_valid_taps(mod, _ctx):
    """Module pass: every static NCHW conv with a constant kernel that mostly multiplies padding is computed
    over the taps that read the image only (see the module docstring)."""
    updates = {gvar: _ConvValidTaps(mod).visit_expr(func)
               for gvar, func in mod.functions.items() if isinstance(func, relax.Function)}
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod
