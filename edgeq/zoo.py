"""The model zoo: ResNet-18 and MobileNetV2 as ONNX models with random (seeded) weights.

What the benchmarks measure and what `edgeq tune --zoo` tunes into the shipped databases: the kernels
(workloads) depend on shapes, not on weight values, so records tuned on these fit trained models of the
same architectures.

The architectures follow torchvision (`resnet18`, `mobilenet_v2`); opset 17,
IR 9, input ``input`` [batch, 3, image, image] float32, output ``output``
[batch, 1000] (logits).

Weights are He-initialised.  BatchNormalization running statistics are not
arbitrary: while building, a rough per-tensor (mean, variance) estimate is
propagated through the network, and each BN's running mean/var is set to the
per-channel moments its conv output would have for that input, so the BN
really normalises (as in a trained net) and activations stay O(1) through
the residual stacks instead of growing with depth.  gamma ~ U(0.8, 1.2),
beta ~ N(0, 0.05).

    python -m edgeq.zoo resnet18.onnx mobilenet_v2.onnx [--batch N] [--image S]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9


class _Net:
    """Graph builder that tracks an estimated (mean, var) for every tensor."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.stats: dict[str, tuple[float, float]] = {"input": (0.0, 1.0)}
        self.n = 0

    def _const(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    def _op(self, op_type, inputs, stats, out=None, **attrs) -> str:
        self.n += 1
        name = f"{op_type.lower()}_{self.n}"
        out = out or name
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        self.stats[out] = stats
        return out

    def conv_bn(self, x, cin, cout, k, stride=1, group=1, act: str | None = "relu") -> str:
        """Conv(no bias) -> BatchNormalization -> optional Relu / Clip(0, 6)."""
        fan_in = cin // group * k * k
        w = self.rng.standard_normal((cout, cin // group, k, k)) * math.sqrt(2.0 / fan_in)
        mu, var = self.stats[x]
        # per-output-channel moments of the conv output for iid inputs with (mu, var)
        # (zero padding and spatial correlation ignored: this is an estimate)
        flat = w.reshape(cout, -1)
        c_mean = mu * flat.sum(1)
        c_var = np.maximum(var * (flat**2).sum(1), 1e-3)
        pre = f"conv{self.n + 1}"
        y = self._op("Conv", [x, self._const(pre + ".w", w)], (0.0, 1.0),
                     kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group)
        gamma = self.rng.uniform(0.8, 1.2, cout)
        beta = self.rng.normal(0.0, 0.05, cout)
        bn = [gamma, beta, c_mean, c_var * self.rng.uniform(0.9, 1.1, cout)]
        names = [self._const(f"{pre}.bn.{p}", v) for p, v in zip(("gamma", "beta", "mean", "var"), bn)]
        y = self._op("BatchNormalization", [y, *names],
                     (float(beta.mean()), float((gamma**2).mean())), epsilon=1e-5)
        if act == "relu":
            y = self._op("Relu", [y], _relu_stats(*self.stats[y]))
        elif act == "relu6":
            lo, hi = self._const(f"{pre}.clip.min", 0.0), self._const(f"{pre}.clip.max", 6.0)
            y = self._op("Clip", [y, lo, hi], _relu_stats(*self.stats[y]))
        return y

    def add(self, a, b, relu=False) -> str:
        (ma, va), (mb, vb) = self.stats[a], self.stats[b]
        y = self._op("Add", [a, b], (ma + mb, va + vb))
        return self._op("Relu", [y], _relu_stats(ma + mb, va + vb)) if relu else y

    def maxpool(self, x) -> str:
        mu, var = self.stats[x]
        # max of 9 neighbours: mean moves up by roughly 1.5 std, spread shrinks
        return self._op("MaxPool", [x], (mu + 1.5 * math.sqrt(var), 0.5 * var),
                        kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])

    def head(self, x, c, classes=1000) -> None:
        """GlobalAveragePool -> Flatten -> Gemm(classes) named ``output``."""
        y = self._op("GlobalAveragePool", [x], self.stats[x])
        y = self._op("Flatten", [y], self.stats[x], axis=1)
        w = self.rng.standard_normal((classes, c)) / math.sqrt(c)
        b = self.rng.normal(0.0, 0.01, classes)
        self._op("Gemm", [y, self._const("fc.w", w), self._const("fc.b", b)], (0.0, 1.0),
                 out="output", transB=1)

    def model(self, name: str, batch: int, image: int) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, image, image])],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 1000])],
            self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION, producer_name="edgeq-zoo")
        onnx.checker.check_model(m, full_check=True)
        return m


def _relu_stats(mu: float, var: float) -> tuple[float, float]:
    """Mean and variance of max(0, N(mu, var))."""
    s = math.sqrt(var)
    a = mu / s
    cdf = 0.5 * (1 + math.erf(a / math.sqrt(2)))
    pdf = math.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    m1 = mu * cdf + s * pdf
    m2 = (mu * mu + var) * cdf + mu * s * pdf
    return m1, max(m2 - m1 * m1, 1e-6)


def resnet18(batch: int = 1, image: int = 224, seed: int = 0) -> onnx.ModelProto:
    """ResNet-18 (BasicBlock x [2, 2, 2, 2]), 1000 classes."""
    g = _Net(seed)
    x = g.maxpool(g.conv_bn("input", 3, 64, 7, stride=2))
    cin = 64
    for stage, cout in enumerate([64, 128, 256, 512]):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            h = g.conv_bn(x, cin, cout, 3, stride)
            h = g.conv_bn(h, cout, cout, 3, act=None)
            short = x if stride == 1 and cin == cout else g.conv_bn(x, cin, cout, 1, stride, act=None)
            x, cin = g.add(h, short, relu=True), cout
    g.head(x, 512)
    return g.model("resnet18", batch, image)


MOBILENET_V2_CONFIG = [  # expansion t, channels c, repeats n, first stride s
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
]


def mobilenet_v2(batch: int = 1, image: int = 224, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2 (width 1.0), ReLU6 as Clip(0, 6), 1000 classes."""
    g = _Net(seed)
    x, cin = g.conv_bn("input", 3, 32, 3, stride=2, act="relu6"), 32
    for t, c, n, s in MOBILENET_V2_CONFIG:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            h = g.conv_bn(x, cin, hidden, 1, act="relu6") if t != 1 else x
            h = g.conv_bn(h, hidden, hidden, 3, stride, group=hidden, act="relu6")
            h = g.conv_bn(h, hidden, c, 1, act=None)  # linear bottleneck
            x = g.add(x, h) if stride == 1 and cin == c else h
            cin = c
    x = g.conv_bn(x, cin, 1280, 1, act="relu6")
    g.head(x, 1280)
    return g.model("mobilenet_v2", batch, image)


MODELS = {"resnet18": ("ResNet-18", resnet18), "mobilenet_v2": ("MobileNetV2", mobilenet_v2)}


def calibration(batch: int = 16, image: int = 224, seed: int = 0) -> dict[str, np.ndarray]:
    """Calibration data for a zoo model: N(0, 1) images (the inputs the random-weight models were scaled for)."""
    return {"input": np.random.default_rng(seed).standard_normal((batch, 3, image, image)).astype(np.float32)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("resnet18_path")
    p.add_argument("mobilenet_v2_path")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for build, path in ((resnet18, a.resnet18_path), (mobilenet_v2, a.mobilenet_v2_path)):
        onnx.save(build(a.batch, a.image, a.seed), path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
