"""Vectorizable float32 exp, sigmoid, tanh and erf for CPU kernels.

TVM lowers `exp`, `sigmoid` (1 / (1 + exp(-x))), `tanh` and `erf` to calls of libm's scalar `expf` / `tanhf` /
`erff`: LLVM has no vector math library to map them onto, so a vectorized loop with a SiLU epilogue calls
`expf` once per lane. On EfficientNet-B0 that was most of the time of every fused conv (604 `expf` call sites
in the library; the model ran 3x slower than onnxruntime). TOPI's `fast_exp` / `fast_tanh` / `fast_erf`
compute the same functions with a range reduction and polynomials built from ordinary float operations, which
vectorize (and fuse into a conv's epilogue like any elementwise op); their error is a few float32 ulps, like
the vectorized exp ONNX Runtime's MLAS kernels use.

`FAST_MATH` is a LegalizeOps map (relax op -> legalization) used for llvm targets; other dtypes keep TVM's.
"""

from __future__ import annotations

import tvm
from tvm import relax, topi


def _sigmoid(x, _attrs=None):
    return topi.divide(1.0, topi.add(1.0, topi.fast_exp(topi.negative(x))))


def _gelu(x, _attrs=None):  # x/2 (1 + erf(x / sqrt 2))
    return topi.multiply(topi.multiply(x, 0.5), topi.add(1.0, topi.fast_erf(topi.multiply(x, 0.7071067811865476))))


def _gelu_tanh(x, _attrs=None):  # x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    inner = topi.multiply(topi.add(x, topi.multiply(0.044715, topi.multiply(x, topi.multiply(x, x)))),
                          0.7978845608028654)
    return topi.multiply(topi.multiply(x, 0.5), topi.add(1.0, topi.fast_tanh(inner)))


# relax op -> float32 form (input tensor, the call's attributes)
_FLOAT32_FORMS = {
    "relax.exp": lambda x, _attrs: topi.fast_exp(x),
    "relax.sigmoid": _sigmoid,
    "relax.nn.silu": lambda x, _attrs: topi.multiply(x, _sigmoid(x)),
    "relax.tanh": lambda x, _attrs: topi.fast_tanh(x),
    "relax.erf": lambda x, _attrs: topi.fast_erf(x),
    "relax.nn.gelu": _gelu,
    "relax.nn.gelu_tanh": _gelu_tanh,
    "relax.nn.softmax": lambda x, attrs: topi.nn.fast_softmax(x, int(attrs.axis)),
}


def _legalize(op_name: str, form):
    fallback = tvm.ir.Op.get(op_name).get_attr("FLegalize")

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        ty = call.args[0].ty
        if not isinstance(ty, relax.TensorType) or str(ty.dtype) != "float32" or ty.shape is None:
            return fallback(bb, call)
        return bb.call_te(lambda x: form(x, call.attrs), call.args[0], primfunc_name_hint=op_name.split(".")[-1])

    return legalize


FAST_MATH = {name: _legalize(name, form) for name, form in _FLOAT32_FORMS.items()}
