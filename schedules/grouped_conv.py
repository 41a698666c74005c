"""Grouped float convolutions (RegNet, ResNeXt, ShuffleNet v1) computed over an explicit group axis.

TOPI's NHWC grouped convolution reads its input at channel ``f // group_out * group_in + rc`` for output channel
``f``: along ``f`` that index is neither contiguous nor invariant, so the default schedule finds no loop to
vectorize and leaves the kernel scalar (RegNetX-400MF ran 5.9x slower than onnxruntime, ResNeXt-50 4.4x, almost
all of it in these convs). Computed as [N, H, W, groups, group_out] instead, the input channel ``g * group_in +
rc`` is invariant along the innermost ``group_out`` axis and the kernel's output channel ``g * group_out + o``
contiguous: the default schedule vectorizes it, register-tiles it and fuses its epilogue like a dense conv. The
reshape back to [N, H, W, C] is an index map the epilogue absorbs.

`GROUPED_CONV` is a LegalizeOps entry for relax.nn.conv2d: float NHWC/HWIO convs with 1 < groups < channels;
everything else (dense, depthwise, integer, other layouts) keeps TVM's legalization.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, topi

_TVM_CONV2D = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")


def _is_grouped_float_nhwc(call: relax.Call) -> bool:
    attrs, (data, weight) = call.attrs, call.args
    ok_types = all(isinstance(a.ty, relax.TensorType) and a.ty.shape is not None and "float" in str(a.ty.dtype)
                   for a in (data, weight))
    if not ok_types or (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NHWC", "HWIO", "NHWC"):
        return False
    channels = data.ty.shape.values[3]
    return isinstance(channels, tvm.tirx.IntImm) and 1 < int(attrs.groups) < int(channels)


def _grouped_conv2d(data: te.Tensor, weight: te.Tensor, attrs, out_dtype: str) -> te.Tensor:
    n, h, w, _ = (int(d) for d in data.shape)
    kh, kw, group_in, out_channels = (int(d) for d in weight.shape)
    groups = int(attrs.groups)
    group_out = out_channels // groups
    (sh, sw), (dh, dw) = ([int(s) for s in attrs.strides], [int(d) for d in attrs.dilation])
    top, left, bottom, right = (int(p) for p in attrs.padding)
    padded = topi.nn.pad(data, [0, top, left, 0], [0, bottom, right, 0]) if top or left or bottom or right else data
    out_h = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    ry, rx, rc = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx"), te.reduce_axis((0, group_in), "rc")
    grouped = te.compute(
        (n, out_h, out_w, groups, group_out),
        lambda b, y, x, g, o: te.sum(
            padded[b, y * sh + ry * dh, x * sw + rx * dw, g * group_in + rc].astype(out_dtype)
            * weight[ry, rx, rc, g * group_out + o].astype(out_dtype), axis=[ry, rx, rc]),
        name="group_conv2d_nhwgc")
    return topi.reshape(grouped, (n, out_h, out_w, out_channels))


def _legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if not _is_grouped_float_nhwc(call):
        return _TVM_CONV2D(bb, call)
    out_dtype = str(call.attrs.out_dtype) if call.attrs.out_dtype else str(call.args[0].ty.dtype)
    return bb.call_te(lambda d, w: _grouped_conv2d(d, w, call.attrs, out_dtype), *call.args,
                      primfunc_name_hint="group_conv2d")


GROUPED_CONV = {"relax.nn.conv2d": _legalize}
