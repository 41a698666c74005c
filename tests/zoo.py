"""Small ONNX models for ORT-vs-edgeq equivalence tests.

Every model is opset 17 / IR 9, builds in milliseconds, has a float32 input
named ``x`` (some also a second runtime input ``y``) with a static shape, and
one output named ``out``.  Weights are random from a seeded generator, so each
builder returns the same model every time.

Public API:
    ZOO                      name -> zero-argument builder
    random_inputs(model)     feeds for a model's runtime inputs
    dynamic_batch_model()    conv/relu/flatten/gemm with input dim "batch"
    unsupported_ops_model()  LpNormalization x2 + Celu, which TVM's Relax ONNX
                             frontend cannot convert
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9

Shape = Sequence[int | str]


def _model(
    nodes: Iterable[onnx.NodeProto],
    inputs: dict[str, Shape],
    outputs: dict[str, Shape | None],
    initializers: Iterable[onnx.TensorProto] = (),
    name: str = "zoo",
    opsets: dict[str, int] | None = None,
) -> onnx.ModelProto:
    """Assemble a checked model; float32 inputs/outputs given as ``name -> shape``.

    An output shape of ``None`` is filled in by ONNX shape inference.
    """
    graph = helper.make_graph(
        list(nodes),
        name,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        list(initializers),
    )
    opset_imports = [helper.make_opsetid(d, v) for d, v in (opsets or {"": OPSET}).items()]
    model = helper.make_model(
        graph, opset_imports=opset_imports, ir_version=IR_VERSION, producer_name="edgeq-tests"
    )
    if any(s is None for s in outputs.values()):
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        model.graph.ClearField("output")
        model.graph.output.extend(inferred.graph.output)
    onnx.checker.check_model(model, full_check=True)
    return model


class _Graph:
    """Tiny builder: collects nodes/initializers, names intermediates t0, t1, ..."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, value, dtype=None) -> str:
        """Initializer; floats become float32, other numpy dtypes are kept."""
        arr = np.asarray(value, dtype=dtype)
        if dtype is None and arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def rand(self, *shape: int, scale: float = 1.0) -> str:
        return self.const(self.rng.standard_normal(shape) * scale)

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or f"t{len(self.nodes)}"
        name = f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def conv(self, x, cin, cout, k=3, stride=1, pad=1, group=1, bias=True, **kw) -> str:
        w = self.rand(cout, cin // group, k, k, scale=np.sqrt(2.0 / (cin // group * k * k)))
        args = (x, w, self.rand(cout, scale=0.1)) if bias else (x, w)
        return self.op("Conv", *args, kernel_shape=[k, k], strides=[stride, stride],
                       pads=[pad] * 4, group=group, **kw)

    def bn(self, x, c, **kw) -> str:
        r = self.rng
        params = [r.uniform(0.5, 1.5, c), r.normal(0, 0.2, c), r.normal(0, 0.3, c),
                  r.uniform(0.5, 2.0, c)]  # gamma, beta, mean, var
        return self.op("BatchNormalization", x, *map(self.const, params), epsilon=1e-5, **kw)

    def gemm(self, x, k, n, **kw) -> str:
        return self.op("Gemm", x, self.rand(n, k, scale=1 / np.sqrt(k)), self.rand(n, scale=0.1),
                       transB=1, **kw)

    def model(self, inputs: dict[str, Shape], name: str) -> onnx.ModelProto:
        return _model(self.nodes, inputs, {"out": None}, self.inits, name=name)


X4 = [1, 8, 12, 12]  # default NCHW test input
X_IMG = [1, 3, 16, 16]


def _single(op_type: str, shape=X4, consts: Sequence = (), **attrs) -> Callable[[], onnx.ModelProto]:
    """Builder for ``out = op_type(x, *consts, **attrs)``."""

    def build() -> onnx.ModelProto:
        g = _Graph(seed=1)
        g.op(op_type, "x", *map(g.const, consts), out="out", **attrs)
        return g.model({"x": shape}, op_type.lower())

    return build


def _binary(op_type: str, xs: Shape, ys: Shape, y_const: bool = False):
    """Builder for ``out = op_type(x, y)``; ``y`` is a runtime input unless ``y_const``."""

    def build() -> onnx.ModelProto:
        g = _Graph(seed=2)
        y = g.rand(*ys) if y_const else "y"
        g.op(op_type, "x", y, out="out", **({"axis": 1} if op_type == "Concat" else {}))
        return g.model({"x": xs} if y_const else {"x": xs, "y": ys}, op_type.lower())

    return build


def _conv(cin, cout, k=3, stride=1, pad=1, group=1, shape=X4, bn=False):
    def build() -> onnx.ModelProto:
        g = _Graph(seed=3)
        h = g.conv("x", cin, cout, k, stride, pad, group, bias=not bn, **({} if bn else {"out": "out"}))
        if bn:
            g.bn(h, cout, out="out")
        return g.model({"x": shape}, "conv_bn" if bn else "conv")

    return build


def _gemm() -> onnx.ModelProto:
    g = _Graph(seed=5)
    g.gemm("x", 32, 10, out="out")  # transB=1, bias C
    return g.model({"x": [2, 32]}, "gemm")


def _mixed() -> onnx.ModelProto:
    """conv-bn-relu-maxpool-[conv-bn + residual add]-relu-globalpool-flatten-gemm-softmax."""
    g = _Graph(seed=4)
    h = g.op("Relu", g.bn(g.conv("x", 3, 8, bias=False), 8))
    a = g.op("MaxPool", h, kernel_shape=[2, 2], strides=[2, 2])
    h = g.op("Relu", g.op("Add", g.bn(g.conv(a, 8, 8, bias=False), 8), a))
    h = g.op("Flatten", g.op("GlobalAveragePool", h), axis=1)
    g.op("Softmax", g.gemm(h, 8, 10), axis=-1, out="out")
    return g.model({"x": X_IMG}, "mixed")


ZOO: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv": _conv(3, 8, k=3, stride=2, pad=1, shape=X_IMG),
    "conv_depthwise": _conv(8, 8, group=8),
    "conv_grouped": _conv(8, 16, group=2),
    "batchnorm": _conv(8, 8, bn=True),
    "relu": _single("Relu"),
    "clip": _single("Clip", consts=(-0.5, 1.0)),  # min/max as (initializer) inputs
    "sigmoid": _single("Sigmoid"),
    "maxpool": _single("MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "avgpool": _single("AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                       count_include_pad=0),
    "global_avgpool": _single("GlobalAveragePool"),
    "gemm": _gemm,
    "matmul": _binary("MatMul", [8, 16], [16, 12]),
    "matmul_batched": _binary("MatMul", [2, 8, 16], [2, 16, 4]),
    "add": _binary("Add", X4, [8, 1, 1]),
    "mul": _binary("Mul", [1, 8, 12, 1], [1, 1, 12], y_const=True),
    "concat": _binary("Concat", X4, [1, 5, 12, 12]),
    "reshape": _single("Reshape", consts=(np.array([0, 4, -1], np.int64),)),
    "flatten": _single("Flatten", axis=1),
    "transpose": _single("Transpose", perm=[0, 2, 3, 1]),
    "softmax": _single("Softmax", shape=[2, 4, 10], axis=-1),
    "mixed": _mixed,
}


def random_inputs(
    model: onnx.ModelProto, seed: int = 0, shapes: dict[str, Sequence[int]] | None = None
) -> dict[str, np.ndarray]:
    """Random feeds for the graph inputs that are not initializers.

    Shapes come from the model; symbolic dims must be given in ``shapes``
    (name -> full shape), otherwise ``ValueError``.
    """
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        ttype = vi.type.tensor_type
        if shapes and vi.name in shapes:
            shape = tuple(shapes[vi.name])
        else:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
            if None in dims:
                raise ValueError(f"input {vi.name!r} has a symbolic dim; pass shapes=")
            shape = tuple(dims)
        dtype = helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.random(shape) < 0.5
        else:
            feeds[vi.name] = rng.integers(0, 10, shape).astype(dtype)
    return feeds


def dynamic_batch_model() -> onnx.ModelProto:
    """Conv(3->8, 3x3/2)-Relu-Flatten-Gemm(512->10); input ``x`` is [batch, 3, 16, 16]."""
    g = _Graph(seed=6)
    h = g.op("Flatten", g.op("Relu", g.conv("x", 3, 8, stride=2)), axis=1)
    g.gemm(h, 8 * 8 * 8, 10, out="out")
    return g.model({"x": ["batch", 3, 16, 16]}, "dynamic_batch")


UNSUPPORTED_OPS = {"LpNormalization": ["lpnorm_a", "lpnorm_b"], "Celu": ["celu_c"]}


def unsupported_ops_model() -> onnx.ModelProto:
    """x -> LpNormalization (lpnorm_a) -> LpNormalization (lpnorm_b) -> Celu (celu_c) -> out.

    LpNormalization and Celu are standard ai.onnx ops absent from TVM 0.27's Relax ONNX convert map (see
    ``UNSUPPORTED_OPS``); the model itself is valid and runs in onnxruntime.  (QLinearConv, also absent there,
    is imported by edgeq through its QDQ rewrite.)
    """
    g = _Graph(seed=7)
    x = "x"
    for name in UNSUPPORTED_OPS["LpNormalization"]:
        g.nodes.append(helper.make_node("LpNormalization", [x], [name + "_out"], name=name, axis=1, p=2))
        x = name + "_out"
    g.nodes.append(helper.make_node("Celu", [x], ["out"], name="celu_c", alpha=1.0))
    return g.model({"x": [1, 4, 8, 8]}, "unsupported_ops")
