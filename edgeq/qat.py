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

``prepare`` traces the model with torch.fx, so residual networks work as well as ``nn.Sequential`` ones; it
returns a ``torch.fx.GraphModule``.
"""

from __future__ import annotations

import copy
import io
import itertools
import operator
import os
import warnings

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

from relay_passes.quantize import pact as pact_np
from relay_passes.quantize.observers import PACTObserver
from relay_passes.quantize import sawb as sawb_np
from schedules import scheme

OPSET = 17


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
        self._observer = PACTObserver(self.bits)

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
# torch ops by the role annotate.py gives their ONNX counterparts: a module class, a function, or a method name
WEIGHTED = (nn.Conv2d, nn.Linear)
RELU = (nn.ReLU, torch.relu, nn.functional.relu, "relu")
ADD = (operator.add, operator.iadd, torch.add, "add", "add_")
KEEP_CODES = (nn.MaxPool2d, nn.Flatten, nn.functional.max_pool2d, torch.flatten, "flatten", "view", "reshape")
PASS = (nn.Dropout, nn.Identity)  # gone from the exported graph
NEW_RANGE = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.functional.avg_pool2d, nn.functional.adaptive_avg_pool2d,
             torch.mean, "mean")


def _is(node: fx.Node, modules: dict, kinds) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], tuple(k for k in kinds if isinstance(k, type)))
    if node.op in ("call_function", "call_method"):
        return any(node.target is k or node.target == k for k in kinds if not isinstance(k, type))
    return False


def prepare(model: nn.Module, bits: int = 2, keep_8bit=("first", "last"), act_bits: int | None = None,
            alpha_l2: float = 0.0) -> fx.GraphModule:
    """A QAT copy of `model` (traced with torch.fx: any model whose forward traces, residual ones included): BN
    folded into the conv / linear before it, Conv2d (groups 1) / Linear swapped for SAWB ``bits``-bit layers
    (``keep_8bit``: "first", "last" and/or positions among the weighted layers, in call order, stay int8), each
    ReLU after a conv / linear / residual add that feeds a low-bit layer replaced by PACT (``act_bits``, default
    ``bits``; ``alpha_l2``: its alpha^2 penalty), uint8 fake quant on every other tensor a quantized op reads or
    writes: the placement of edgeq's w2a2 annotate pass, so the export builds to integer and bit-serial kernels.
    Ops with no quantized form here stay float. Call :func:`calibrate` before training."""
    act_bits = bits if act_bits is None else act_bits
    try:
        gm = fuse(copy.deepcopy(model).eval(), inplace=True)  # traces, and folds each BN into its conv/linear
    except Exception as e:  # noqa: BLE001 - fx raises many kinds on control flow it cannot trace
        raise ValueError(f"prepare: torch.fx cannot trace the model: {e}") from None
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    if any(n.op == "call_module" and isinstance(modules[n.target], nn.modules.batchnorm._BatchNorm) for n in nodes):
        raise ValueError("prepare: a BatchNorm must directly follow the Conv2d / Linear whose output only it reads")
    weighted = [n for n in nodes if _is(n, modules, WEIGHTED)]
    if not weighted:
        raise ValueError("prepare: no Conv2d/Linear layer")
    keep = {weighted[0] if k == "first" else weighted[-1] if k == "last" else weighted[k] for k in keep_8bit}
    low = {n for n in weighted if bits < 8 and n not in keep  # grouped convs stay 8-bit, as in annotate.py
           and not (isinstance(modules[n.target], nn.Conv2d) and modules[n.target].groups != 1)}
    _Placement(gm, modules, low, bits, act_bits, alpha_l2).run(nodes)
    gm.graph.lint()
    gm.recompile()
    return gm


class _Placement:
    """The walk of :func:`prepare` over the traced graph: one quantizer per quantized tensor, in call order."""

    def __init__(self, gm: fx.GraphModule, modules: dict, low: set, bits: int, act_bits: int, alpha_l2: float):
        self.gm, self.modules, self.low = gm, modules, low
        self.bits, self.act_bits, self.alpha_l2 = bits, act_bits, alpha_l2
        self.quantizer: dict[fx.Node, nn.Module] = {}  # value -> the quantizer whose codes it holds
        self.fused: set[fx.Node] = set()
        self.count = itertools.count()

    def run(self, nodes) -> None:
        for node in nodes:
            args = [a for a in node.args if isinstance(a, fx.Node)]
            if node in self.fused or not args:
                continue
            if _is(node, self.modules, WEIGHTED):
                self._quantize_inputs(args[:1])
                layer = self.modules[node.target]
                self._output(self._replace(node, _swap(layer, self.bits_of(node))))
            elif _is(node, self.modules, ADD) and len(args) == 2 and all(a.op != "get_attr" for a in args):
                self._quantize_inputs(args)
                self._output(node)
            elif args[0] not in self.quantizer:
                continue  # float in, float out
            elif _is(node, self.modules, RELU) or _is(node, self.modules, NEW_RANGE):
                self._after(node, ActQuant8())
            elif _is(node, self.modules, KEEP_CODES):
                self._after(node, Requant(self.quantizer[args[0]]), self.quantizer[args[0]])
            elif _is(node, self.modules, PASS):
                self.quantizer[node] = self.quantizer[args[0]]

    def bits_of(self, node: fx.Node) -> int:
        return self.bits if node in self.low else 8

    def _name(self) -> str:
        return f"edgeq_quant{next(self.count)}"

    def _replace(self, node: fx.Node, module: nn.Module) -> fx.Node:
        """`node` as a call of `module` (a new submodule: a layer called twice gets two)."""
        name = self._name()
        self.gm.add_submodule(name, module)
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)
        return new

    def _after(self, node: fx.Node, module: nn.Module, quantizer: nn.Module | None = None) -> fx.Node:
        """Insert `module` after `node`, read by all of node's users; its output holds `quantizer`'s codes."""
        name = self._name()
        self.gm.add_submodule(name, module)
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        self.quantizer[new] = quantizer or module
        return new

    def _quantize_inputs(self, args) -> None:
        for arg in args:
            if arg not in self.quantizer:
                self._after(arg, ActQuant8())

    def _output(self, node: fx.Node) -> None:
        """A conv / linear / add output: its only-consumer ReLU is fused (PACT where it feeds a low-bit layer,
        else ReLU + 8-bit), otherwise the output itself is 8-bit."""
        users = list(node.users)
        if len(users) == 1 and _is(users[0], self.modules, RELU):
            relu = users[0]
            self.fused.add(relu)
            if self.act_bits < 8 and self._feeds_low_bit(relu):
                pact = PACTReLU(self.act_bits, l2=self.alpha_l2)
                self.quantizer[self._replace(relu, pact)] = pact
            else:
                self._after(relu, ActQuant8())
        else:
            self._after(node, ActQuant8())

    def _feeds_low_bit(self, node: fx.Node) -> bool:
        """Whether a low-bit layer reads `node`, directly or through ops that keep its codes."""
        stack = list(node.users)
        while stack:
            user = stack.pop()
            if user in self.low:
                return True
            if _is(user, self.modules, KEEP_CODES) or _is(user, self.modules, PASS):
                stack.extend(user.users)
        return False


def _swap(layer: nn.Module, bits: int) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        new = QConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                      layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, bits=bits)
    else:
        new = QLinear(layer.in_features, layer.out_features, layer.bias is not None, bits=bits)
    new.load_state_dict(layer.state_dict())
    return new


def called_modules(model: nn.Module) -> list[nn.Module]:
    """The modules a prepared model calls, in the order it calls them."""
    if not isinstance(model, fx.GraphModule):
        return list(model.modules())
    return [model.get_submodule(n.target) for n in model.graph.nodes if n.op == "call_module"]


def quantizers(model: nn.Module):
    """The PACT and 8-bit activation quantizers, in call order."""
    return list({id(m): m for m in called_modules(model) if isinstance(m, (PACTReLU, ActQuant8))}.values())


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
        from targets.atomic import write_atomic

        write_atomic(path, proto.SerializeToString())
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
