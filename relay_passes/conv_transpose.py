"""ConvTranspose as a convolution, so it runs on the channels-last conv kernels.

TVM 0.27 legalizes ``conv2d_transpose`` only in NCHW/IOHW, and the CPU layout pass (NHWC convs) hands it an
NHWC input: the build stopped with "CodeGenVM cannot emit this Relax operator" (PaddleOCR's DBNet head).
A transposed convolution with stride s, pads (pt, pl, pb, pr), output padding (oh, ow), dilation d and groups g
is the stride-1 convolution, with the same dilation and groups, of

* the input with s - 1 zeros inserted between neighbouring pixels,
* padded by d(k - 1) - pt before and d(k - 1) - pb + oh after (a negative pad is a crop),
* with the kernel flipped spatially and its in/out channels swapped within each group
  (IOHW [g * Ci/g, Co/g, kh, kw] -> OIHW [g * Co/g, Ci/g, kh, kw]).

Zero insertion costs s^2 times the MACs of a direct kernel; the convolution it feeds is the vectorized,
multi-core one, and a constant kernel's flip and transpose fold at compile time.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

_CONV2D_TRANSPOSE = tvm.ir.Op.get("relax.nn.conv2d_transpose")


def _insert_zeros(bb, x, stride: tuple[int, int]):
    """[N, C, H, W] -> [N, C, H * sh, W * sw] with x at every (sh, sw)-th pixel: s - 1 zeros after each."""
    sh, sw = stride
    if (sh, sw) == (1, 1):
        return x
    n, c, h, w = (int(v) for v in x.ty.shape.values)
    spread = bb.normalize(relax.op.reshape(x, (n, c, h, 1, w, 1)))
    spread = bb.normalize(relax.op.nn.pad(spread, [0, 0, 0, 0, 0, 0, 0, sh - 1, 0, 0, 0, sw - 1]))
    return bb.normalize(relax.op.reshape(spread, (n, c, h * sh, w * sw)))


def _pad_or_crop(bb, x, before: list[int], after: list[int]):
    """Pad (positive) or crop (negative) the two spatial axes of NCHW x."""
    crop_begin = [max(-b, 0) for b in before]
    crop_end = [max(-a, 0) for a in after]
    if any(crop_begin + crop_end):
        sizes = [int(v) for v in x.ty.shape.values][2:]
        x = bb.normalize(relax.op.strided_slice(x, axes=[2, 3], begin=crop_begin,
                                                end=[s - e for s, e in zip(sizes, crop_end)]))
    pads = [max(b, 0) for b in before], [max(a, 0) for a in after]
    if any(pads[0] + pads[1]):
        x = bb.normalize(relax.op.nn.pad(x, [0, 0, 0, 0, pads[0][0], pads[1][0], pads[0][1], pads[1][1]]))
    return x


def _conv_kernel(bb, weight, groups: int):
    """IOHW transposed-conv kernel -> OIHW conv kernel: channels swapped per group, flipped spatially."""
    c_in, c_out_g, kh, kw = (int(v) for v in weight.ty.shape.values)
    w = bb.normalize(relax.op.reshape(weight, (groups, c_in // groups, c_out_g, kh, kw)))
    w = bb.normalize(relax.op.permute_dims(w, [0, 2, 1, 3, 4]))
    w = bb.normalize(relax.op.reshape(w, (groups * c_out_g, c_in // groups, kh, kw)))
    return bb.normalize(relax.op.flip(relax.op.flip(w, axis=2), axis=3))


def _is_rewritable(call) -> bool:
    a = call.attrs
    static = all(isinstance(arg.ty, relax.TensorType) and arg.ty.shape is not None
                 and all(isinstance(v, tvm.tirx.IntImm) for v in arg.ty.shape.values) for arg in call.args)
    return static and a.data_layout == "NCHW" and a.kernel_layout == "IOHW" and a.out_layout == "NCHW"


@mutator
class _ConvTransposeAsConv(PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op != _CONV2D_TRANSPOSE or not _is_rewritable(call):
            return call
        a, bb = call.attrs, self.builder_
        x, weight = call.args
        kh, kw = (int(v) for v in weight.ty.shape.values[2:])
        stride = [int(s) for s in a.strides]
        dilation = [int(d) for d in a.dilation]
        pt, pl, pb, pr = (int(p) for p in a.padding)
        oh, ow = (int(o) for o in a.output_padding)
        reach = [dilation[0] * (kh - 1), dilation[1] * (kw - 1)]
        spread = _insert_zeros(bb, x, stride)  # carries s - 1 trailing zeros that count towards the pad after
        before = [reach[0] - pt, reach[1] - pl]
        after = [reach[0] - pb + oh - (stride[0] - 1), reach[1] - pr + ow - (stride[1] - 1)]
        padded = _pad_or_crop(bb, spread, before, after)
        return relax.op.nn.conv2d(padded, _conv_kernel(bb, weight, int(a.groups)), strides=1, padding=0,
                                  dilation=dilation, groups=int(a.groups), out_dtype=str(call.ty.dtype))


@tvm.transform.module_pass(opt_level=0, name="EdgeqConvTransposeAsConv")
def conv_transpose_as_conv(mod, _ctx):
    """Module pass: every static NCHW conv2d_transpose becomes zero insertion + pad + conv2d."""
    updates = {gvar: _ConvTransposeAsConv(mod).visit_expr(func)
               for gvar, func in mod.functions.items() if isinstance(func, relax.Function)}
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod
