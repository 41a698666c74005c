"""Realize: rewrite the QDQ patterns of an imported Relax module into integer kernels.

Input: the Relax import of a QDQ ONNX model (edgeq's own annotate output or one written by ONNX Runtime /
PyTorch), with weights already taken out of their DequantizeLinear (see weights.extract_weights).  Every
``quantize(f(dequantize(x), ...))`` whose float part ``f`` has an integer version becomes one integer kernel from
`schedules.qkernels` that reads and writes 8-bit tensors directly: conv2d (+bias, ReLU/Clip; grouped and
depthwise), matmul by a constant (+bias, activation), add (+activation), multiply of two tensors, max / average /
global-average pool, concat, split, reshape, and ``quantize(dequantize(x))`` itself (identity or a rescale): so
chains stay integer and dequantize->quantize pairs between integer ops disappear.  Everything else stays float
between its dequantize and quantize.  Integer 4-D tensors live in NHWC (channels contiguous, what the
dot-product kernels read); layout changes are emitted only where a float op needs the model's NCHW.

Activations are uint8 on x86 (VNNI multiplies u8 x s8) and int8 on ARM (sdot is s8 x s8): the pass converts a
model's zero points (q - 128 is exact), so either kind of QDQ model runs on either target.

Low-bit layers (SAWB weights, stored as odd int8 integers 2c - (2^b - 1); PACT activations, a quantize clamped
to codes 0..2^k-1 with zero point 0, e.g. after Clip(0, alpha)) become `schedules.bitserial` popcount kernels
with the weights as bit planes; their epilogue clamps straight to the next layer's k-bit codes.

Every constant given to a kernel is recorded with its precision and the fp32 bytes it stands for (storage.py):
the manifest's weight bytes by precision are read off the module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from schedules import scheme

from . import storage
from .exprs import const as _const
from .exprs import is_const as _is_const
from .exprs import op_name as _op_name
from .lookup import island_table
from .weights import Weight, weight_key

_SCRATCH = "edgeq_realized_main"  # the rewritten function's name while it is built next to the original
_DOT_DEPTH = 4  # input channels one dot-product instruction reduces (vpdpbusd, sdot)


@dataclass
class QTensor:
    """An integer tensor of the realized graph: its Relax var and how its integers map to reals."""

    var: object  # relax.Var
    scale: float
    zero_point: int
    dtype: str
    layout: str  # "NHWC": a 4-D tensor of the model (NCHW) kept channels-last; "native": the model's layout
    bits: int = 8  # < 8: q - zero_point in 0..2^bits-1 (PACT codes), what the bit-serial kernels read


def realize(mod, weights: dict[str, Weight], dtype: str = "uint8", target=None):
    """The module with integer kernels in place of its realizable QDQ patterns (and dead float code removed).

    Low-bit layers (SAWB weights: all integers odd, |w| < 2^b with b <= 4) become bit-serial popcount kernels
    where ``target`` has popcount (None: assume it does); int8 kernels otherwise.
    """
    import tvm
    from tvm import relax

    func = mod["main"]
    blocks = func.body.blocks
    if len(blocks) != 1 or not isinstance(blocks[0], relax.DataflowBlock):
        return mod  # control flow: left float
    realizer = _Realizer(mod, weights, dtype, target)
    new_func = realizer.rewrite(func)
    built = realizer.bb.get()
    out = tvm.IRModule({gv: f for gv, f in built.functions.items() if gv.name_hint != _SCRATCH}, attrs=mod.attrs)
    out["main"] = new_func.with_attr("global_symbol", "main")
    return relax.transform.DeadCodeElimination(["main"])(out).with_attr(storage.ATTR, realizer.stored)


class _Realizer:
    def __init__(self, mod, weights, dtype, target=None):
        from tvm import relax

        self.target = target
        self.bb = relax.BlockBuilder(mod)
        self.weights = weights
        self.dtype = dtype
        self.defs: dict = {}  # original var -> original value
        self.vmap: dict = {}  # original var -> new var
        self.qmap: dict = {}  # original var of a quantize -> QTensor
        self.layouts: dict = {}  # (id of QTensor var, layout) -> converted var
        self.splits: dict = {}  # (original split tuple var, layout) -> the integer split's tuple var
        self.stored: dict = {}  # storage.key of each kernel constant -> (precision, layer, fp32 bytes)

    # --- driving ---------------------------------------------------------------------------------------
    def rewrite(self, func):
        from tvm import relax

        params = [relax.Var(p.name, p.ty) for p in func.params]
        self.vmap.update({old: new for old, new in zip(func.params, params)})
        bb = self.bb
        with bb.function(_SCRATCH, params, attrs={k: v for k, v in (func.attrs or {}).items() if k != "global_symbol"}):
            with bb.dataflow():
                for binding in func.body.blocks[0].bindings:
                    self.defs[binding.var] = binding.value
                    self._binding(binding.var, binding.value)
                outputs = bb.emit_output(self._remap(func.body.body))
            gvar = bb.emit_func_output(outputs)
        return bb.get()[gvar]

    def _binding(self, var, value):
        op = _op_name(value)
        if op == "relax.quantize" and _per_tensor(value):
            realized = self._realize(value)
            self.qmap[var] = realized if realized is not None else self._float_quantize(value)
            self.vmap[var] = self.qmap[var].var  # only read through _native by other ops
            return
        if op == "relax.dequantize" and value.args[0] in self.qmap and _per_tensor(value):
            qt = self._native(self.qmap[value.args[0]])
            self.vmap[var] = self.bb.emit(_dequantize(qt))
            return
        self.vmap[var] = self.bb.emit(self._remap(value))

    def _remap(self, expr):
        from tvm import relax

        if isinstance(expr, relax.Var):
            if expr in self.qmap:
                return self._native(self.qmap[expr]).var
            return self.vmap.get(expr, expr)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([self._remap(f) for f in expr.fields])
        if isinstance(expr, relax.TupleGetItem):
            return relax.TupleGetItem(self._remap(expr.tuple_value), expr.index)
        if isinstance(expr, relax.Call):
            return relax.Call(expr.op, [self._remap(a) for a in expr.args], expr.attrs, expr.ty_args)
        return expr

    # --- helpers -----------------------------------------------------------------------------------------
    def _def(self, var):
        return self.defs.get(var)

    def _dequantized(self, expr) -> QTensor | None:
        """The integer tensor behind ``dequantize(q)`` (per tensor), or None."""
        value = self._def(expr)
        if _op_name(value) == "relax.dequantize" and value.args[0] in self.qmap and _per_tensor(value):
            return self.qmap[value.args[0]]
        return None

    def _out_params(self, quantize) -> tuple[float, int, str]:
        """Scale, zero point and dtype of a quantize's output, converted to the pass's activation dtype."""
        scale = float(_const(quantize.args[1]))
        zero = int(_const(quantize.args[2]))
        return scale, zero + _dtype_offset(str(quantize.attrs.out_dtype), self.dtype), self.dtype

    def _float_quantize(self, value) -> QTensor:
        from tvm import relax

        scale, zero, dtype = self._out_params(value)
        x = self._remap(value.args[0])
        var = self.bb.emit(relax.op.quantize(x, relax.const(scale, "float32"), relax.const(zero, dtype),
                                             axis=-1, out_dtype=dtype))
        return QTensor(var, scale, zero, dtype, "native")

    def _layout(self, qt: QTensor, layout: str) -> QTensor:
        from tvm import relax

        if qt.layout == layout or len(qt.var.ty.shape) != 4:
            return qt
        key = (id(qt.var), layout)
        if key not in self.layouts:
            axes = [0, 2, 3, 1] if layout == "NHWC" else [0, 3, 1, 2]
            self.layouts[key] = self.bb.emit(relax.op.permute_dims(qt.var, axes))
        return QTensor(self.layouts[key], qt.scale, qt.zero_point, qt.dtype, layout, qt.bits)

    def _native(self, qt: QTensor) -> QTensor:
        return self._layout(qt, "native")

    def _nhwc(self, qt: QTensor) -> QTensor:
        return self._layout(qt, "NHWC")

    def _constant(self, array: np.ndarray, label: str, layer: str, fp32_bytes: int):
        """A kernel's constant, recorded with its precision and the fp32 bytes of the parameters it holds."""
        from tvm import relax

        array = np.ascontiguousarray(array)
        self.stored[storage.key(array)] = (label, layer, int(fp32_bytes))
        return relax.const(array)

    def _weight_const(self, array: np.ndarray, weight: Weight, weight_bits: int = 8):
        """Weights as the kernel holds them: int8, or b-bit codes packed into bit planes of unsigned words."""
        label = "int8" if array.dtype == np.int8 else f"{weight_bits}-bit packed"
        return self._constant(array, label, weight.layer, weight.values.size * 4)

    def _epilogue_consts(self, bias_i32, multiplier, shift, bias, weight: Weight) -> list:
        """The int32 bias, multiplier and shift of a conv / dense: they stand for the fp32 bias (if any)."""
        fp32 = 0 if bias is None else np.size(bias) * 4
        return [self._constant(_int32(bias_i32), storage.REQUANTIZE, weight.layer, fp32),
                self._constant(multiplier, storage.REQUANTIZE, weight.layer, 0),
                self._constant(shift, storage.REQUANTIZE, weight.layer, 0)]

    def _emit(self, kernel, *args, name: str, **attrs):
        return self.bb.emit_te(kernel, *args, primfunc_name_hint=name, **attrs)

    def _requantize(self, qt: QTensor, scale: float, zero: int, lo: int, hi: int) -> QTensor:
        """qt rescaled to (scale, zero) and clamped: skipped when nothing would change."""
        from schedules import qkernels

        qmin, qmax = scheme.DTYPE_RANGES[self.dtype]
        same = np.float32(qt.scale) == np.float32(scale) and qt.zero_point == zero
        if same and ((lo, hi) == (qmin, qmax) or (qt.bits < 8 and lo <= zero and hi >= zero + 2**qt.bits - 1)):
            return QTensor(qt.var, scale, zero, self.dtype, qt.layout, qt.bits)
        multiplier, shift = scheme.fixed_point_multiplier(qt.scale / (scale * 2**qkernels.QSHIFT))
        var = self._emit(qkernels.qrequantize, qt.var, multiplier=int(multiplier), shift=int(shift),
                         input_zero_point=qt.zero_point, output_zero_point=zero, out_min=lo, out_max=hi,
                         out_dtype=self.dtype, name="qrequantize")
        return QTensor(var, scale, zero, self.dtype, qt.layout)

    # --- patterns ----------------------------------------------------------------------------------------
    def _realize(self, quantize) -> QTensor | None:
        """The integer version of quantize(f(...)), or None when f has none."""
        from tvm import relax

        scale, zero, dtype = self._out_params(quantize)
        out_qp = scheme.QParams(np.asarray(scale, np.float32), np.asarray(zero, np.int32), dtype)
        core, (lo, hi) = self._activation(quantize.args[0])
        qlo, qhi = scheme.activation_clamp(out_qp, lo, hi)
        value = self._def(core)
        op = _op_name(value)
        if isinstance(value, relax.TupleGetItem) and _op_name(self._def(value.tuple_value)) == "relax.split":
            op = "relax.split"  # one part of a split: its handler takes the TupleGetItem
        bias = None
        if op == "relax.add" and any(_is_const(a) for a in value.args):
            inner = next(a for a in value.args if not _is_const(a))
            if _op_name(self._def(inner)) in ("relax.nn.conv2d", "relax.matmul"):
                bias = _const(next(a for a in value.args if _is_const(a)))
                value = self._def(inner)
                op = _op_name(value)
        handler = _HANDLERS.get(op)
        if handler is None:
            result = None
        elif op == "relax.dequantize":
            result = handler(self, core, scale, zero, qlo, qhi)
        else:
            result = handler(self, value, bias, scale, zero, qlo, qhi)
        if result is None:
            return self._lookup(quantize.args[0], out_qp)
        top = qhi - zero  # codes q - zero in [0, 2^k - 1]: a PACT tensor (a clamp at alpha), read as k-bit planes
        if result is not None and qlo == zero and 0 < top < 255 and not top & (top + 1):
            result = replace(result, bits=int(top).bit_length())
        return result

    def _lookup(self, expr, out_qp: scheme.QParams) -> QTensor | None:
        """An elementwise float island on one 8-bit tensor as a table of its codes (lookup.py), in that tensor's
        layout."""
        from schedules import qkernels

        found = island_table(self.defs, self._dequantized, expr, out_qp)
        if found is None:
            return None
        qt, table = found
        var = self._emit(qkernels.qlookup, qt.var, self._constant(table, storage.LOOKUP, "", 0),
                         first_code=scheme.DTYPE_RANGES[qt.dtype][0], name="qlookup")
        return QTensor(var, float(out_qp.scale), int(out_qp.zero_point), self.dtype, qt.layout)

    def _activation(self, expr):
        """(producer under a fused ReLU/Clip, (lo, hi)); (expr, (None, None)) when there is none."""
        value = self._def(expr)
        op = _op_name(value)
        if op == "relax.nn.relu":
            return value.args[0], (0.0, None)
        if op == "relax.clip":
            return value.args[0], (float(value.args[1].value), float(value.args[2].value))
        bounds = {}
        while _call_tir_name(value) in ("minimum", "maximum") and _is_const(value.args[1].fields[1]):
            bound = float(_const(value.args[1].fields[1]))
            bounds.setdefault(_call_tir_name(value), bound)
            expr = value.args[1].fields[0]
            value = self._def(expr)
        if bounds:
            return expr, (bounds.get("maximum"), bounds.get("minimum"))
        return expr, (None, None)

    def _conv2d(self, conv, bias, scale, zero, lo, hi):
        from schedules import qkernels

        attrs = conv.attrs
        qt = self._dequantized(conv.args[0])
        weight = self._weight(conv.args[1])
        if (qt is None or weight is None or str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW"
                or weight.axis not in (0, None)):
            return None
        qt = self._nhwc(qt)
        w = weight.values.astype(np.int32)  # OIHW
        channels = w.shape[0]
        weight_bits = _low_bit_weight(w)
        if weight_bits and int(attrs.groups) == 1:
            return self._bitserial_conv2d(conv, qt, w, weight, weight_bits, bias, scale, zero, lo, hi)
        if int(attrs.groups) == 1 and w.shape[1] % _DOT_DEPTH:
            qt, w = self._pad_channels(qt, w)
        padding = tuple(int(p) for p in attrs.padding)
        if int(attrs.groups) == channels and w.shape[1] == 1:
            w, padding = self._pad_kernel_rows(w, padding, int(attrs.dilation[0]))
        w_scale = np.broadcast_to(weight.scale, (channels,)).astype(np.float64)
        b = np.zeros(channels) if bias is None else np.asarray(bias, np.float64).reshape(-1)
        acc_scale = qt.scale * w_scale
        bias_i32 = np.round(b / acc_scale) - qt.zero_point * w.reshape(channels, -1).sum(axis=1)
        multiplier, shift = scheme.fixed_point_multiplier(acc_scale / scale)
        hwio = w.astype(np.int8).transpose(2, 3, 1, 0)
        if 1 < int(attrs.groups) and w.shape[1] > 1:
            hwio = qkernels.group_weight(hwio, int(attrs.groups))
        var = self._emit(
            qkernels.qconv2d, qt.var, self._weight_const(hwio, weight),
            *self._epilogue_consts(bias_i32, multiplier, shift, bias, weight),
            high_word=scheme.uses_high_word(shift),
            strides=tuple(int(s) for s in attrs.strides), padding=padding,
            dilation=tuple(int(d) for d in attrs.dilation),
            groups=int(attrs.groups), input_zero_point=qt.zero_point, output_zero_point=zero,
            out_min=lo, out_max=hi, out_dtype=self.dtype, name="qconv2d")
        return QTensor(var, scale, zero, self.dtype, "NHWC")

    def _bitserial_conv2d(self, conv, qt, w, weight, weight_bits, bias, scale, zero, lo, hi):
        """A SAWB-weight conv: bit-serial kernel (weights as bit planes) or, without popcount, the int8 kernel."""
        from schedules import bitserial

        attrs = conv.attrs
        channels = w.shape[0]
        codes_hwio = ((w + (2**weight_bits - 1)) // 2).astype(np.uint8).transpose(2, 3, 1, 0)
        kernel, weights, extra = bitserial.conv2d_for_target(self.target, codes_hwio, weight_bits,
                                                             word=bitserial.choose_word(w.shape[1]))
        code_zero = qt.zero_point  # the zero point of what the kernel multiplies
        if kernel is bitserial.bitserial_qconv2d:  # int8 q is read as the code q + 128
            extra = {**extra, "activation_bits": qt.bits}
            code_zero += bitserial.CODE_OFFSET[qt.dtype]
        bias_i32, multiplier, shift = self._requant_params(code_zero, qt.scale, w.reshape(channels, -1).sum(axis=1),
                                                           weight, bias, channels, scale)
        var = self._emit(kernel, qt.var, self._weight_const(weights, weight, weight_bits),
                         *self._epilogue_consts(bias_i32, multiplier, shift, bias, weight),
                         high_word=scheme.uses_high_word(shift),
                         strides=tuple(int(s) for s in attrs.strides),
                         padding=tuple(int(p) for p in attrs.padding), dilation=tuple(int(d) for d in attrs.dilation),
                         input_zero_point=qt.zero_point, output_zero_point=zero, out_min=lo, out_max=hi,
                         out_dtype=self.dtype, name=kernel.__name__, **extra)
        return QTensor(var, scale, zero, self.dtype, "NHWC")

    @staticmethod
    def _requant_params(zero_point, in_scale, weight_sums, weight, bias, channels, scale):
        """Integer bias (with the zero-point term -zp * sum(w)), multiplier and shift of a conv / dense."""
        w_scale = np.broadcast_to(weight.scale, (channels,)).astype(np.float64)
        b = np.zeros(channels) if bias is None else np.broadcast_to(np.asarray(bias, np.float64).reshape(-1),
                                                                    (channels,))
        acc_scale = in_scale * w_scale
        bias_i32 = np.round(b / acc_scale) - zero_point * weight_sums
        multiplier, shift = scheme.fixed_point_multiplier(acc_scale / scale)
        return bias_i32, multiplier, shift

    def _bitserial_dense(self, data, qt, weight, weight_bits, bias, scale, zero, lo, hi):
        from schedules import bitserial

        w = weight.values.astype(np.int32)  # [K, N]
        channels = w.shape[1]
        codes = ((w + (2**weight_bits - 1)) // 2).astype(np.uint8)
        kernel, weights, extra = bitserial.dense_for_target(self.target, codes, weight_bits,
                                                            word=bitserial.choose_word(w.shape[0]))
        code_zero = qt.zero_point
        if kernel is bitserial.bitserial_qdense:
            extra = {**extra, "activation_bits": qt.bits}
            code_zero += bitserial.CODE_OFFSET[qt.dtype]
        bias_i32, multiplier, shift = self._requant_params(code_zero, qt.scale, w.sum(axis=0), weight, bias, channels,
                                                           scale)
        return self._emit(kernel, data, self._weight_const(weights, weight, weight_bits),
                          *self._epilogue_consts(bias_i32, multiplier, shift, bias, weight),
                          high_word=scheme.uses_high_word(shift),
                          input_zero_point=qt.zero_point, output_zero_point=zero, out_min=lo, out_max=hi,
                          out_dtype=self.dtype, name=kernel.__name__, **extra)

    def _pad_channels(self, qt: QTensor, w: np.ndarray) -> tuple[QTensor, np.ndarray]:
        """Pad input channels to a multiple of the dot product's depth (the first conv: 1 or 3 channels).

        The data is padded with its zero point and the weights with zeros, so the result is unchanged, and
        the conv takes the dot-product kernel instead of a scalar loop (measured: ResNet-18's 7x7 stem conv
        on 3 channels was 40% of the int8 model's time).
        """
        from tvm import relax

        extra = -w.shape[1] % _DOT_DEPTH
        var = self.bb.emit(relax.op.nn.pad(qt.var, [0, 0, 0, 0, 0, 0, 0, extra], pad_value=float(qt.zero_point)))
        w = np.pad(w, [(0, 0), (0, extra), (0, 0), (0, 0)])
        return QTensor(var, qt.scale, qt.zero_point, qt.dtype, qt.layout), w

    def _pad_kernel_rows(self, w: np.ndarray, padding: tuple, dilation: int) -> tuple[np.ndarray, tuple]:
        """A depthwise kernel (OIHW) padded with zero rows to a multiple of what the target's depthwise dot
        product reduces at once (``schedules.depthwise_dot``), and the input with that many more rows of bottom
        padding: the output is unchanged, and the conv runs on VNNI (1.6-1.9x faster) instead of int16 multiplies."""
        from schedules.depthwise_dot import depthwise_rows

        extra = -w.shape[2] % depthwise_rows(self.target, w.shape[0], dilation, self.dtype, w.shape[2])
        if not extra:
            return w, padding
        top, left, bottom, right = padding
        return np.pad(w, [(0, 0), (0, 0), (0, extra), (0, 0)]), (top, left, bottom + extra * dilation, right)

    def _matmul(self, matmul, bias, scale, zero, lo, hi):
        from tvm import relax

        from schedules import qkernels

        qt = self._dequantized(matmul.args[0])
        weight = self._weight(matmul.args[1])
        if qt is None or weight is None or weight.values.ndim != 2 or weight.axis not in (1, None):
            return None
        qt = self._native(qt)
        shape = [int(d) for d in qt.var.ty.shape]
        w = weight.values.astype(np.int32)  # [K, N]
        channels = w.shape[1]
        w_scale = np.broadcast_to(weight.scale, (channels,)).astype(np.float64)
        b = np.zeros(channels) if bias is None else np.broadcast_to(np.asarray(bias, np.float64).reshape(-1),
                                                                    (channels,))
        acc_scale = qt.scale * w_scale
        bias_i32 = np.round(b / acc_scale) - qt.zero_point * w.sum(axis=0)
        multiplier, shift = scheme.fixed_point_multiplier(acc_scale / scale)
        data = qt.var if len(shape) == 2 else self.bb.emit(relax.op.reshape(qt.var, (-1, shape[-1])))
        weight_bits = _low_bit_weight(w)
        var = None
        if weight_bits:
            var = self._bitserial_dense(data, qt, weight, weight_bits, bias, scale, zero, lo, hi)
        if var is None:
            var = self._emit(qkernels.qdense, data, self._weight_const(weight.values, weight),
                             *self._epilogue_consts(bias_i32, multiplier, shift, bias, weight),
                             high_word=scheme.uses_high_word(shift),
                             input_zero_point=qt.zero_point, output_zero_point=zero, out_min=lo, out_max=hi,
                             out_dtype=self.dtype, name="qdense")
        if len(shape) != 2:
            var = self.bb.emit(relax.op.reshape(var, (*shape[:-1], channels)))
        return QTensor(var, scale, zero, self.dtype, "native")

    def _add(self, add, bias, scale, zero, lo, hi):
        from schedules import qkernels

        a, b = (self._dequantized(x) for x in add.args)
        if a is None or b is None or bias is not None:
            return None
        same_shape = [int(d) for d in a.var.ty.shape] == [int(d) for d in b.var.ty.shape]
        layout = "NHWC" if same_shape and "NHWC" in (a.layout, b.layout) else "native"
        a, b = self._layout(a, layout), self._layout(b, layout)
        ma, mb, shift = scheme.add_multipliers(a.scale, b.scale, scale)
        var = self._emit(qkernels.qadd, a.var, b.var, a_multiplier=ma, b_multiplier=mb, shift=shift,
                         a_zero_point=a.zero_point, b_zero_point=b.zero_point,
                         output_zero_point=zero, out_min=lo, out_max=hi, out_dtype=self.dtype, name="qadd")
        return QTensor(var, scale, zero, self.dtype, layout)

    def _mul(self, mul, bias, scale, zero, lo, hi):
        """Product of two integer tensors (broadcast: squeeze-excitation's gate); 4-D operands in NHWC, where a
        [N, C, 1, 1] gate broadcasts as [N, 1, 1, C]."""
        from schedules import qkernels

        a, b = (self._dequantized(x) for x in mul.args)
        if a is None or b is None or bias is not None:
            return None
        ranks = {len(a.var.ty.shape), len(b.var.ty.shape)}
        layout = "NHWC" if ranks == {4} and "NHWC" in (a.layout, b.layout) else "native"
        a, b = self._layout(a, layout), self._layout(b, layout)
        multiplier, shift = scheme.fixed_point_multiplier(a.scale * b.scale / scale)
        var = self._emit(qkernels.qmul, a.var, b.var, multiplier=int(multiplier), shift=int(shift),
                         a_zero_point=a.zero_point, b_zero_point=b.zero_point, output_zero_point=zero,
                         out_min=lo, out_max=hi, out_dtype=self.dtype, name="qmul")
        return QTensor(var, scale, zero, self.dtype, layout)

    def _max_pool(self, pool, bias, scale, zero, lo, hi):
        from schedules import qkernels

        attrs = pool.attrs
        qt = self._dequantized(pool.args[0])
        if qt is None or bias is not None or str(attrs.layout) != "NCHW":
            return None
        qt = self._nhwc(qt)
        pool_size, strides, dilation = _ints(attrs.pool_size), _ints(attrs.strides), _ints(attrs.dilation)
        padding = _ceil_padding(_ints(attrs.padding), [int(d) for d in qt.var.ty.shape][1:3],
                                [int(d) for d in pool.ty.shape][2:], pool_size, strides, dilation)
        var = self._emit(qkernels.qmax_pool2d, qt.var, pool_size=pool_size, strides=strides,
                         padding=padding, dilation=dilation, name="qmax_pool2d")
        return self._requantize(QTensor(var, qt.scale, qt.zero_point, qt.dtype, "NHWC", qt.bits), scale, zero, lo, hi)

    def _avg_pool(self, pool, bias, scale, zero, lo, hi):
        attrs = pool.attrs
        padded = any(int(p) for p in attrs.padding)
        if (bias is not None or str(attrs.layout) != "NCHW" or bool(attrs.ceil_mode)
                or (padded and not bool(attrs.count_include_pad)) or any(int(d) != 1 for d in attrs.dilation)):
            return None  # the window count varies at the borders: float
        return self._average(pool.args[0], _ints(attrs.pool_size), _ints(attrs.strides), _ints(attrs.padding),
                             scale, zero, lo, hi)

    def _mean(self, mean, bias, scale, zero, lo, hi):
        qt = self._dequantized(mean.args[0])
        axes = sorted(int(a) % 4 for a in (mean.attrs.axis or [])) if qt is not None else None
        if qt is None or bias is not None or len(qt.var.ty.shape) != 4 or axes != [2, 3] or not mean.attrs.keepdims:
            return None
        _, _, height, width = self._native_shape(qt)
        return self._average(mean.args[0], (height, width), (1, 1), (0, 0, 0, 0), scale, zero, lo, hi)

    def _native_shape(self, qt: QTensor) -> list[int]:
        shape = [int(d) for d in qt.var.ty.shape]
        return [shape[0], shape[3], shape[1], shape[2]] if qt.layout == "NHWC" else shape

    def _average(self, source, pool_size, strides, padding, scale, zero, lo, hi):
        from schedules import qkernels

        qt = self._nhwc(self._dequantized(source))
        count = int(np.prod(pool_size))
        multiplier, shift = scheme.fixed_point_multiplier(qt.scale / (scale * count))
        var = self._emit(qkernels.qavg_pool2d, qt.var, pool_size=tuple(pool_size), strides=tuple(strides),
                         padding=tuple(padding), multiplier=int(multiplier), shift=int(shift),
                         input_zero_point=qt.zero_point, output_zero_point=zero, out_min=lo, out_max=hi,
                         out_dtype=self.dtype, name="qavg_pool2d")
        return QTensor(var, scale, zero, self.dtype, "NHWC")

    def _concat(self, concat, bias, scale, zero, lo, hi):
        from tvm import relax

        parts = [self._dequantized(f) for f in concat.args[0].fields]
        if bias is not None or any(p is None for p in parts):
            return None
        axis = int(concat.attrs.axis)
        rank = len(parts[0].var.ty.shape)
        layout = "NHWC" if rank == 4 and axis % 4 == 1 else "native"
        axis = 3 if layout == "NHWC" else axis
        parts = [self._requantize(self._layout(p, layout), scale, zero, lo, hi) for p in parts]
        var = self.bb.emit(relax.op.concat([p.var for p in parts], axis=axis))
        return QTensor(var, scale, zero, self.dtype, layout)

    def _split_part(self, item, bias, scale, zero, lo, hi):
        """Part ``item.index`` of a split of an integer tensor (along channels: in NHWC); the split is emitted
        once, for the first part realized."""
        from tvm import relax

        split = self._def(item.tuple_value)
        qt = self._dequantized(split.args[0])
        if qt is None or bias is not None:
            return None
        rank = len(qt.var.ty.shape)
        axis = int(split.attrs.axis) % rank
        layout = "NHWC" if rank == 4 and axis == 1 else "native"
        qt = self._layout(qt, layout)
        key = (item.tuple_value, layout)
        if key not in self.splits:
            sections = split.attrs.indices_or_sections
            sections = int(sections) if isinstance(sections, int) or hasattr(sections, "value") else [
                int(i) for i in sections]
            self.splits[key] = self.bb.emit(relax.op.split(qt.var, sections, axis=3 if layout == "NHWC" else axis))
        part = self.bb.emit(relax.TupleGetItem(self.splits[key], item.index))
        return self._requantize(QTensor(part, qt.scale, qt.zero_point, qt.dtype, layout, qt.bits), scale, zero, lo, hi)

    def _reshape(self, reshape, bias, scale, zero, lo, hi):
        from tvm import relax

        qt = self._dequantized(reshape.args[0])
        if qt is None or bias is not None:
            return None
        qt = self._native(qt)
        var = self.bb.emit(relax.op.reshape(qt.var, reshape.args[1]))
        return self._requantize(QTensor(var, qt.scale, qt.zero_point, qt.dtype, "native"), scale, zero, lo, hi)

    def _identity(self, dequantize_var, scale, zero, lo, hi):
        qt = self._dequantized(dequantize_var)
        return None if qt is None else self._requantize(qt, scale, zero, lo, hi)

    def _weight(self, expr) -> Weight | None:
        return self.weights.get(weight_key(_const(expr))) if _is_const(expr) else None


# The integer version of each op, keyed by the Relax op under the quantize: handler(realizer, the op's call, bias,
# out scale, out zero point, clamp lo, clamp hi) -> QTensor, or None to leave it float. A dequantize (a requantize
# between two quantization parameters) takes (realizer, the dequantized var, scale, zero point, lo, hi).
_HANDLERS = {
    "relax.nn.conv2d": _Realizer._conv2d, "relax.matmul": _Realizer._matmul, "relax.add": _Realizer._add,
    "relax.multiply": _Realizer._mul,
    "relax.nn.max_pool2d": _Realizer._max_pool, "relax.nn.avg_pool2d": _Realizer._avg_pool,
    "relax.mean": _Realizer._mean, "relax.concat": _Realizer._concat, "relax.reshape": _Realizer._reshape,
    "relax.split": _Realizer._split_part,
    "relax.dequantize": _Realizer._identity,
}


# --- low-bit weights -------------------------------------------------------------------------------------
_MAX_BITSERIAL_WEIGHT_BITS = 4


def _low_bit_weight(w: np.ndarray) -> int:
    """b when every integer of a weight is odd with |w| <= 2^b - 1, b <= 4 (SAWB levels 2c - (2^b - 1)); else 0."""
    if w.size == 0 or np.any(w % 2 == 0):
        return 0
    bits = int(np.abs(w).max()).bit_length()  # the smallest b with max|w| <= 2^b - 1
    return bits if bits <= _MAX_BITSERIAL_WEIGHT_BITS else 0


# --- expression helpers ---------------------------------------------------------------------------------

def _ceil_padding(padding, in_size, out_size, pool_size, strides, dilation) -> tuple[int, ...]:
    """(top, left, bottom, right) padding that gives the float op's output size with floor rounding: ceil_mode's
    last, partial windows read extra bottom/right padding. Padding holds the dtype's minimum, which a max never
    picks over a real value, and which is what quantize gives a float window of padding only (-inf)."""
    top, left, bottom, right = padding
    extra = [max(0, (o - 1) * s + d * (k - 1) + 1 - (i + before + after))
             for i, o, k, s, d, before, after in zip(in_size, out_size, pool_size, strides, dilation,
                                                     (top, left), (bottom, right))]
    return top, left, bottom + extra[0], right + extra[1]


def _call_tir_name(value) -> str | None:
    """The name of the PrimFunc a call_tir calls, without the numeric suffix of shape variants (minimum3)."""
    if _op_name(value) != "relax.call_tir":
        return None
    return str(value.args[0].name_hint).rstrip("0123456789")


def _per_tensor(value) -> bool:
    return all(_is_const(a) and _const(a).size == 1 for a in value.args[1:3])


def _int32(values: np.ndarray) -> np.ndarray:
    info = np.iinfo(np.int32)
    return np.clip(values, info.min, info.max).astype(np.int32)


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _dtype_offset(source: str, target: str) -> int:
    """Add to a zero point (and every integer) when moving from one 8-bit dtype to the other."""
    return scheme.DTYPE_RANGES[target][0] - scheme.DTYPE_RANGES[source][0]


def _dequantize(qt: QTensor):
    from tvm import relax

    return relax.op.dequantize(qt.var, relax.const(qt.scale, "float32"), relax.const(qt.zero_point, qt.dtype),
                               axis=-1, out_dtype="float32")
