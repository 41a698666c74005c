"""Quantization-aware training helper (torch): PACT activations + SAWB weights, exported as edgeq's QDQ form.

Post-training W2A2 loses accuracy because the network never saw 2-bit values; fine-tuning with the quantizers in
the forward pass (straight-through estimators, Choi et al.) recovers most of it.  The modules here quantize
exactly like edgeq's w2a2 annotate pass (relay_passes/quantize/sawb.py, pact.py, scheme.py), and :func:`export`
writes the same QDQ pattern (odd int8 SAWB integers behind a per-channel DequantizeLinear; Clip(0, alpha) ->
QuantizeLinear/DequantizeLinear with scale alpha / (2^k - 1), zero point 0), so ``edgeq.build`` turns the
exported model straight into bit-serial kernels and onnxruntime runs it as the oracle.

    model = qat.prepare(fp32_model, bits=2, alpha_l2=1e-4)  # fold BN, swap layers, insert quantizers
    qat.calibrate(model, images)              # initial alpha (PACT MSE optimum) and 8-bit ranges
    qat.fine_tune(model, images, labels)      # or your own loop: loss + qat.regularization(model)
    qat.export(model, "m.onnx", example)      # then edgeq.build("m.onnx", "host", out, input_shapes=...)

``prepare`` handles (nested) ``nn.Sequential`` models built of Conv2d, BatchNorm2d, ReLU, MaxPool2d, Flatten,
Dropout, Identity and Linear layers.
"""

from __future__ import annotations

import copy
import io
import os
import warnings

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from relay_passes.quantize import pact as pact_np
from relay_passes.quantize import sawb as sawb_np
from relay_passes.quantize import scheme

OPSET = 17
_SHAPE_ONLY = (nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)  # keep the codes (and scale) of their input


# ----------------------------------------------------------------------------------------------- PACT
class _PACTClip(torch.autograd.Function):
    """clip(x, 0, alpha) with PACT's gradients: dx = 1 on [0, alpha), dalpha = sum of the upstream grad where
    x >= alpha (the quantization rounding after it is a straight-through identity)."""

    @staticmethod
    def forward(ctx, x, alpha):
        ctx.save_for_backward(x, alpha)
        return torch.minimum(torch.clamp(x, min=0.0), alpha)

    @staticmethod
    def backward(ctx, grad):
        x, alpha = ctx.saved_tensors
        grad_x = grad * ((x >= 0) & (x < alpha)).to(grad.dtype)
        grad_alpha = (grad * (x >= alpha).to(grad.dtype)).sum().reshape(alpha.shape)
        return grad_x, grad_alpha


def _ste(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Forward ``quantized``, backward identity (straight-through estimator)."""
    return x + (quantized - x).detach()


class PACTReLU(nn.Module):
    """ReLU replaced by PACT: y = round(clip(x, 0, alpha) * n / alpha) * alpha / n, n = 2^bits - 1, alpha learned.

    ``l2`` is the weight of the alpha^2 penalty :func:`regularization` adds (PACT regularizes alpha so it
    does not grow to cover rare outliers)."""

    def __init__(self, bits: int = 2, alpha: float = 1.0, l2: float = 0.0):
        super().__init__()
        pact_np.scale(1.0, bits)  # validates bits
        self.bits, self.l2 = int(bits), float(l2)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self._observer = None

    @property
    def steps(self) -> int:
        return 2**self.bits - 1

    def forward(self, x):
        if self._observer is not None:  # calibrate(): histogram of the float input
            self._observer.update(x.detach().cpu().numpy())
        if torch.onnx.is_in_onnx_export():
            return _ExportPACT.apply(x, float(self.alpha.detach()), self.bits)
        y = _PACTClip.apply(x, self.alpha)
        step = self.alpha.detach() / self.steps
        return _ste(y, torch.round(y.detach() / step) * step)

    def scale(self) -> float:
        return pact_np.scale(float(self.alpha.detach()), self.bits)

    def begin_calibration(self):
        self._observer = pact_np.PACTObserver(self.bits)

    @torch.no_grad()
    def end_calibration(self):
        self.alpha.fill_(self._observer.alpha())
        self._observer = None

    def regularizer(self) -> torch.Tensor:
        return self.l2 * self.alpha**2

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha={float(self.alpha.detach()):.4g}"


class _ExportPACT(torch.autograd.Function):
    """Export form of PACT: Clip(x, 0, alpha) -> QuantizeLinear -> DequantizeLinear (scale alpha/n, zp uint8 0)."""

    @staticmethod
    def forward(ctx, x, alpha, bits):
        step = alpha / (2**bits - 1)
        return torch.round(torch.clamp(x, 0.0, alpha) / step) * step

    @staticmethod
    def symbolic(g, x, alpha, bits):
        lo = g.op("Constant", value_t=torch.tensor(0.0))
        hi = g.op("Constant", value_t=torch.tensor(alpha, dtype=torch.float32))
        clipped = g.op("Clip", x, lo, hi)
        return _qdq(g, clipped, pact_np.scale(alpha, bits), 0)


def _qdq(g, x, scale: float, zero_point: int):
    s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
    z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=torch.uint8))
    return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)


# ----------------------------------------------------------------------------------------------- 8-bit activations
class ActQuant8(nn.Module):
    """uint8 per-tensor asymmetric fake quant (scheme.activation_qparams) on a range tracked during training
    (min/max of the first batch, then an exponential moving average): the 8-bit tensors of first/last layers."""

    def __init__(self, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))
        self._calibrating = False

    def begin_calibration(self):
        self._calibrating = True
        self.initialized.fill_(False)

    def end_calibration(self):
        self._calibrating = False

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min(), x.detach().max()
        if self._calibrating and bool(self.initialized):  # running min / max over the calibration batches
            self.lo.copy_(torch.minimum(self.lo, lo)), self.hi.copy_(torch.maximum(self.hi, hi))
        elif not bool(self.initialized):
            self.lo.copy_(lo), self.hi.copy_(hi), self.initialized.fill_(True)
        else:
            self.lo.lerp_(lo, self.momentum), self.hi.lerp_(hi, self.momentum)

    def qparams(self) -> tuple[float, int]:
        qp = scheme.activation_qparams(float(self.lo), float(self.hi), "uint8")
        return float(qp.scale), int(qp.zero_point)

    def forward(self, x):
        if self.training or self._calibrating:
            self.observe(x)
        if self._calibrating or not bool(self.initialized):
            return x  # not calibrated yet: float
        scale, zero = self.qparams()
        if torch.onnx.is_in_onnx_export():
            return _ExportQDQ.apply(x, scale, zero)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)


class _ExportQDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero):
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)

    @staticmethod
    def symbolic(g, x, scale, zero):
        return _qdq(g, x, scale, zero)


class Requant(nn.Module):
    """The Q/DQ pair of an earlier quantizer again, after an op that keeps its codes (max pool, flatten): the
    realize pass needs every integer op's input and output behind Q/DQ; numerically an identity."""

    def __init__(self, source: nn.Module):
        super().__init__()
        self.source = [source]  # a list: not a submodule (no duplicate parameters)

    def forward(self, x):
        src = self.source[0]
        scale, zero = (src.scale(), 0) if isinstance(src, PACTReLU) else src.qparams()
        if torch.onnx.is_in_onnx_export():
            return _ExportQDQ.apply(x, scale, zero)
        return x  # max pool / flatten of fake-quantized values are already on the grid


# ----------------------------------------------------------------------------------------------- weights
def sawb_fake_quantize(w: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """sawb.fake_quantize per output channel (axis 0): the very function annotate.py quantizes with."""
    q = sawb_np.fake_quantize(w.detach().cpu().numpy(), bits, axis=0)
    return torch.from_numpy(q).to(w.device, w.dtype)


class _QuantWeight:
    """Mixin: the weight the layer computes with (fake-quantized, straight-through gradient) and its integers."""

    bits: int

    def quantized_weight(self) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            ints, scale = self.weight_integers()
            return _ExportWeight.apply(self.weight, ints, scale)
        if self.bits < 8:
            return _ste(self.weight, sawb_fake_quantize(self.weight, self.bits))
        return torch.fake_quantize_per_channel_affine(  # has its own straight-through gradient
            self.weight, *self._int8_params(), 0, -127, 127)

    def _int8_params(self):
        qp = scheme.weight_qparams(self.weight.detach().cpu().numpy(), 0)
        return torch.from_numpy(qp.scale), torch.zeros(qp.scale.shape, dtype=torch.int32)

    def weight_integers(self) -> tuple[np.ndarray, np.ndarray]:
        """(int8 integers, float32 per-channel scale) exactly as annotate.py writes them."""
        w = self.weight.detach().cpu().numpy().astype(np.float32)
        if self.bits < 8:
            q = sawb_np.quantize_weights(w, self.bits, 0)
            return q.integers().astype(np.int8), np.asarray(q.scale, np.float32)
        qp = scheme.weight_qparams(w, 0)
        return scheme.quantize_weight(w, qp), qp.scale


class _ExportWeight(torch.autograd.Function):
    """Export form of a quantized weight: DequantizeLinear(int8 integers, per-channel scale, zp 0, axis 0)."""

    @staticmethod
    def forward(ctx, weight, ints, scale):
        shape = (-1,) + (1,) * (ints.ndim - 1)
        return torch.from_numpy((ints.astype(np.float32) * scale.reshape(shape)).astype(np.float32))

    @staticmethod
    def symbolic(g, weight, ints, scale):
        q = g.op("Constant", value_t=torch.from_numpy(ints))
        s = g.op("Constant", value_t=torch.from_numpy(scale))
        z = g.op("Constant", value_t=torch.zeros(scale.shape, dtype=torch.int8))
        return g.op("DequantizeLinear", q, s, z, axis_i=0)


class QConv2d(_QuantWeight, nn.Conv2d):
    """Conv2d whose weights are SAWB ``bits``-bit (bits < 8) or int8 per channel, straight-through gradient."""

    def __init__(self, *args, bits: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.bits = int(bits)

    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}"


class QLinear(_QuantWeight, nn.Linear):
    """Linear with SAWB or int8 per-output-channel weights (exported as Gemm transB=1: axis 0 of [out, in])."""

    def __init__(self, *args, bits: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.bits = int(bits)

    def forward(self, x):
        return nn.functional.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}"


# ----------------------------------------------------------------------------------------------- prepare
def _leaves(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


def _fold_bn(layers: list[nn.Module]) -> list[nn.Module]:
    """Conv2d followed by BatchNorm2d -> one Conv2d with bias (running statistics): what inference computes."""
    out = []
    for layer in layers:
        if isinstance(layer, nn.BatchNorm2d) and out and isinstance(out[-1], nn.Conv2d):
            conv = copy.deepcopy(out[-1])
            factor = layer.weight.detach() / torch.sqrt(layer.running_var + layer.eps)
            bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(layer.running_mean)
            conv.weight = nn.Parameter(conv.weight.detach() * factor.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - layer.running_mean) * factor + layer.bias.detach())
            out[-1] = conv
        elif isinstance(layer, nn.BatchNorm2d):
            raise ValueError("prepare: a BatchNorm2d must follow a Conv2d")
        else:
            out.append(layer)
    return out


def _swap(layer: nn.Module, bits: int) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        new = QConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                      layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, bits=bits)
    else:
        new = QLinear(layer.in_features, layer.out_features, layer.bias is not None, bits=bits)
    new.load_state_dict(layer.state_dict())
    return new


def prepare(model: nn.Module, bits: int = 2, keep_8bit=("first", "last"), act_bits: int | None = None,
            alpha_l2: float = 0.0) -> nn.Sequential:
    """A QAT copy of a Sequential model: BN folded, Conv2d (groups 1) / Linear swapped for SAWB ``bits``-bit
    layers (``keep_8bit``: "first", "last" and/or positions among the weighted layers stay int8), each ReLU
    feeding a low-bit layer replaced by PACT (``act_bits``, default ``bits``; ``alpha_l2``: its alpha^2 penalty),
    uint8 fake quant on the other quantized tensors: the placement of edgeq's w2a2 annotate pass.  Call
    :func:`calibrate` before training."""
    act_bits = bits if act_bits is None else act_bits
    layers = _fold_bn([copy.deepcopy(m) for m in _leaves(model)])
    for layer in layers:
        if not isinstance(layer, (nn.Conv2d, nn.Linear, nn.ReLU, *_SHAPE_ONLY)):
            raise ValueError(f"prepare: unsupported layer {type(layer).__name__}")
    weighted = [i for i, m in enumerate(layers) if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not weighted:
        raise ValueError("prepare: no Conv2d/Linear layer")
    keep = {weighted[0] if k == "first" else weighted[-1] if k == "last" else weighted[k] for k in keep_8bit}
    low = {i for i in weighted if bits < 8 and i not in keep  # grouped convs stay 8-bit, as in annotate.py
           and not (isinstance(layers[i], nn.Conv2d) and layers[i].groups != 1)}

    def next_weighted(i):
        """The weighted layer reading layer i's output through shape-only layers, or None."""
        for j in range(i + 1, len(layers)):
            if j in weighted:
                return j
            if not isinstance(layers[j], _SHAPE_ONLY):
                return None
        return None

    out: list[nn.Module] = []
    quantizer = None  # the quantizer of the tensor flowing now (None: float)
    for i, layer in enumerate(layers):
        if i in weighted:
            if quantizer is None:
                quantizer = ActQuant8()
                out.append(quantizer)
            out.append(_swap(layer, bits if i in low else 8))
            if not (i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)):
                quantizer = ActQuant8()  # output without a fused ReLU (logits): 8-bit
                out.append(quantizer)
        elif isinstance(layer, nn.ReLU):
            if i - 1 in weighted and next_weighted(i) in low:
                quantizer = PACTReLU(act_bits, l2=alpha_l2)
                out.append(quantizer)
            else:
                quantizer = ActQuant8()
                out += [layer, quantizer]
        else:  # shape-only
            out.append(layer)
            if quantizer is not None and not isinstance(layer, (nn.Dropout, nn.Identity)):
                out.append(Requant(quantizer))
    return nn.Sequential(*out)


def quantizers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (PACTReLU, ActQuant8))]


@torch.no_grad()
def calibrate(model: nn.Module, inputs: torch.Tensor, batch: int = 256) -> nn.Module:
    """Initial ranges from data, one quantizer at a time in graph order (each sees its upstream quantizers
    already set): 8-bit ones take the min/max of their input, PACT the MSE-optimal alpha of
    relay_passes.quantize.pact (the post-training choice), so training starts from the PTQ model."""
    was_training = model.training
    model.eval()
    for q in quantizers(model):
        q.begin_calibration()
        for start in range(0, len(inputs), batch):
            model(inputs[start:start + batch])
        q.end_calibration()
    model.train(was_training)
    return model


def fine_tune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 10, lr: float = 1e-3,
              batch: int = 64, seed: int = 0) -> nn.Module:
    """Adam + cosine schedule on cross entropy + :func:`regularization`, fixed shuffling seed (a classifier's
    QAT fine-tune; bring your own loop for anything else)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx]) + regularization(model)
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def regularization(model: nn.Module) -> torch.Tensor:
    """Sum of the PACT alpha^2 penalties (each PACTReLU's ``l2`` times alpha^2): add it to the loss."""
    terms = [m.regularizer() for m in model.modules() if isinstance(m, PACTReLU)]
    return torch.stack(terms).sum() if terms else torch.tensor(0.0)


# ----------------------------------------------------------------------------------------------- export
def export(model: nn.Module, path: str | os.PathLike | None, example: torch.Tensor, input_name: str = "input",
           output_name: str = "output", dynamic_batch: bool = True) -> onnx.ModelProto:
    """Write the QAT model as the QDQ ONNX edgeq compiles to integer / bit-serial kernels (and onnxruntime runs).

    Constants become initializers (realize reads weights as DequantizeLinear of an int8 initializer)."""
    model.eval()
    buf = io.BytesIO()
    axes = {input_name: {0: "N"}, output_name: {0: "N"}} if dynamic_batch else None
    with warnings.catch_warnings():  # the quantizers' parameters are constants of the export, as intended
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=OPSET, input_names=[input_name],
                          output_names=[output_name], dynamic_axes=axes, do_constant_folding=True)
    proto = _constants_to_initializers(onnx.load_from_string(buf.getvalue()))
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        from .artifact import write_bytes_atomic

        write_bytes_atomic(path, proto.SerializeToString())
    return proto


def _constants_to_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    graph = proto.graph
    keep = []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None:
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value), node.output[0]))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return proto
