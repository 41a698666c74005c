"""schedules.fast_math: exp / sigmoid / tanh / erf / GELU / softmax run as vectorized polynomials, not libm calls,
within a few float32 ulps of the float64 functions (scipy) over the whole range a model feeds them."""

import re

import numpy as np
import pytest
import scipy.special
from conftest import llvm_assembly
from onnx import TensorProto, helper

import edgeq
import targets
from edgeq.compiler import compile_module

# the float32 input: a dense sweep of [-100, 100] (beyond exp's float32 range both ways), Gaussian values at the
# scale activations have, and the special values
X = np.concatenate([np.linspace(-100, 100, 8192), np.random.default_rng(0).standard_normal(8160) * 4,
                    [np.inf, -np.inf, 0.0, -0.0] * 8]).astype(np.float32).reshape(1, -1)
F64 = X.astype(np.float64)
SQRT1_2 = np.sqrt(0.5)

# ONNX op (opset) -> float64 reference, from the definitions in the ONNX operator spec
FUNCTIONS = {
    ("Exp", 17): np.exp,
    ("Sigmoid", 17): scipy.special.expit,
    ("Tanh", 17): np.tanh,
    ("Erf", 17): scipy.special.erf,
    ("Gelu", 20): lambda x: 0.5 * x * (1 + scipy.special.erf(x * SQRT1_2)),
    ("Softmax", 17): lambda x: scipy.special.softmax(x.reshape(-1, ROW), axis=-1).reshape(x.shape),
}
ROW = 64  # softmax rows
ULPS = 8  # measured worst: 4.4 (erf); the polynomials are a few float32 roundings deep
EXP_RANGE = (-87.3, 88.37)  # fast_exp's range reduction: outside it the result is flushed to 0 / overflows to inf


def _model(op: str, opset: int):
    shape = [X.size // ROW, ROW] if op == "Softmax" else list(X.shape)
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"])], op,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return edgeq.load_onnx(model)


def _within(op, x, got, want) -> bool:
    """|error| <= ULPS float32 ulps of the result; GELU's x/2 (1 + erf) also carries erf's error of a few ulps
    of 1 scaled by x/2 (where erf saturates at -1, GELU's true value, below 1e-8 |x|, becomes 0); softmax the
    rounding of its row sum. Results
    below float32's smallest normal number may flush to 0 (sigmoid(x) for x < -88)."""
    bound = ULPS * np.spacing(np.abs(want).astype(np.float32)).astype(np.float64) + np.finfo(np.float32).tiny
    if op == "Gelu":
        bound += ULPS * 0.5 * np.abs(x) * np.finfo(np.float32).eps
    if op == "Softmax":  # the row's float32 sum of ROW exps: relative error up to (ROW - 1) eps
        bound += ROW * np.finfo(np.float32).eps * np.abs(want)
    both_nan = np.isnan(got) & np.isnan(want)
    return bool(np.all(both_nan | (got == want) | (np.abs(got - want) <= bound)))


@pytest.mark.parametrize(("op", "opset"), FUNCTIONS, ids=[op for op, _ in FUNCTIONS])
def test_fast_functions_match_float64_within_a_few_ulps(op, opset, tmp_path):
    art = edgeq.build(_model(op, opset), "host", tmp_path / op)
    x = X.reshape(art.inputs[0].shape)
    got = art.run({"x": x})["y"].astype(np.float64).reshape(X.shape)
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 and exp(inf): NaN / inf, as in float32
        want = FUNCTIONS[op, opset](x.astype(np.float64)).reshape(X.shape)
    inside = np.isfinite(F64) & (F64 > EXP_RANGE[0]) & (F64 < EXP_RANGE[1]) if op in ("Exp", "Softmax") \
        else np.ones(X.shape, bool)
    if op == "Softmax":  # rows of the sweep mixing +-inf are NaN in both; compare the finite rows
        inside = np.repeat(np.isfinite(x).all(-1), ROW).reshape(X.shape)
    assert _within(op, F64[inside], got[inside], want[inside])
    if op == "Exp":
        assert np.all(got[F64 <= EXP_RANGE[0]] <= np.exp(np.float32(EXP_RANGE[0])))  # flushed towards 0, >= 0
        assert np.all(got[F64 <= EXP_RANGE[0]] >= 0)
        assert np.all(got[F64 >= EXP_RANGE[1]] >= np.float32(2.3e38))  # overflows (to inf) at most 0.35 early


@pytest.mark.parametrize(("op", "opset", "libm"), [("Sigmoid", 17, "expf"), ("Tanh", 17, "tanhf"),
                                                   ("Erf", 17, "erff"), ("Gelu", 20, "erff")])
def test_no_libm_call_is_left_in_the_kernels(op, opset, libm):
    asm = llvm_assembly(compile_module(_model(op, opset), targets.resolve("host")))
    assert not re.search(rf"call\w*\s+{libm}\b", asm)
    assert re.search(r"^\s+v\w+ps\s+%[xyz]mm", asm, re.M)  # packed float instructions: the polynomial, vectorized
