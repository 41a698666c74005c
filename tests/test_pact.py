"""PACT activation quantization against the paper's formulas in numpy, post-training alpha, and QAT patterns."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ort_outputs
from onnx import TensorProto, helper, numpy_helper

from relay_passes.quantize import pact
from relay_passes.quantize.observers import Histogram, PACTObserver


def test_clip_is_the_papers_absolute_value_form():
    x = np.random.default_rng(0).normal(0, 3, 1000)
    np.testing.assert_allclose(pact.clip(x, 2.5), np.clip(x, 0, 2.5), atol=1e-12)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_quantize_formula(bits):
    alpha = 1.3
    x = np.random.default_rng(bits).normal(0.5, 1.0, 5000)
    steps = 2**bits - 1
    expected = np.round(np.clip(x, 0, alpha) * steps / alpha) * alpha / steps
    np.testing.assert_allclose(pact.fake_quantize(x, alpha, bits), expected, rtol=1e-6, atol=1e-7)
    codes = pact.quantize(x, alpha, bits)
    assert codes.min() == 0 and codes.max() == steps
    assert pact.scale(alpha, bits) == pytest.approx(alpha / steps)


def _sample_mse(x, alpha, bits):
    return float(np.sum((pact.fake_quantize(x, alpha, bits).astype(np.float64) - x) ** 2))


def _relu_gaussian(n=200_000, seed=1):
    return np.maximum(np.random.default_rng(seed).normal(0.2, 1.0, n), 0.0)


def test_histogram_mse_matches_the_sample_mse():
    x = _relu_gaussian()
    h = Histogram(2048)
    h.add(x)
    alphas = np.array([0.5, 1.0, 1.5, 2.5])
    errors = pact.histogram_mse(h, alphas, 2)
    for a, e in zip(alphas, errors):
        assert e == pytest.approx(_sample_mse(x, a, 2), rel=0.01)


@pytest.mark.parametrize("bits", [2, 4])
def test_optimal_alpha_matches_a_brute_force_sweep_on_the_samples(bits):
    x = _relu_gaussian(n=50_000, seed=bits)
    h = Histogram(2048)
    for chunk in np.array_split(x, 7):  # several batches: the histogram grows
        h.add(chunk)
    alpha = pact.optimal_alpha(h, bits)
    grid = np.linspace(0.2, x.max(), 400)
    brute = grid[int(np.argmin([_sample_mse(x, a, bits) for a in grid]))]
    assert alpha == pytest.approx(brute, rel=0.03)
    # what matters: its error is within 0.5% of the best
    assert _sample_mse(x, alpha, bits) <= 1.005 * min(_sample_mse(x, a, bits) for a in grid)


def test_clipping_quantization_tradeoff():
    x = _relu_gaussian()
    obs2, obs4, obs8 = PACTObserver(bits=2), PACTObserver(bits=4), PACTObserver(bits=None)
    for obs in (obs2, obs4, obs8):
        obs.update(x)
    a2, a4 = obs2.alpha(), obs4.alpha()
    lo8, a8 = obs8.range("uint8")  # bits from the dtype: 8
    assert lo8 == 0.0 and a2 < a4 < a8 <= x.max()  # fewer bits: clip harder
    assert obs2.range("uint8") == (0.0, a2)  # explicit bits win over the dtype
    # max-scaling is much worse at 2 bits than the calibrated alpha
    assert _sample_mse(x, a2, 2) < 0.6 * _sample_mse(x, x.max(), 2)


def test_pact_is_a_calibration_observer_on_the_shared_histogram():
    from relay_passes.quantize.observers import METHODS, make_observer

    obs = make_observer("pact", bits=2, bins=512)
    assert isinstance(obs, PACTObserver) and obs.histogram.bins == 512
    assert "pact" not in METHODS  # not offered for 8-bit tensors: it clips negatives to 0
    x = _relu_gaussian(n=20_000)
    obs.update(x)
    assert obs.range("uint8") == (0.0, pact.optimal_alpha(obs.histogram, 2))


def test_constant_and_empty_data():
    obs = PACTObserver(bits=2)
    with pytest.raises(ValueError):
        obs.alpha()
    obs.update(np.full(10, 0.7))
    assert obs.alpha() == pytest.approx(0.7)


# ---------------------------------------------------------------------------------------------- QAT patterns
def _qat_model(kind: str, alpha: float, bits: int, opset: int = 13) -> onnx.ModelProto:
    steps = 2**bits - 1
    inits = [numpy_helper.from_array(np.array(alpha / steps, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "zp")]
    if kind == "clip":
        inits += [numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(alpha, np.float32), "hi")]
        nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["c"], name="clip")]
    elif kind == "clip6":
        nodes = [helper.make_node("Clip", ["x"], ["c"], name="clip", min=0.0, max=alpha)]
    else:
        inits.append(numpy_helper.from_array(np.array(alpha, np.float32), "a"))
        nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
                 helper.make_node("Min", ["a", "r"] if kind == "min_swapped" else ["r", "a"], ["c"], name="min")]
    nodes += [helper.make_node("QuantizeLinear", ["c", "s", "zp"], ["q"], name="q"),
              helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq")]
    graph = helper.make_graph(nodes, "pact", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize("kind,opset", [("clip", 13), ("clip6", 10), ("min", 13), ("min_swapped", 13)])
@pytest.mark.parametrize("bits", [2, 4])
def test_find_pact_clips_and_the_formula_matches_onnxruntime(kind, opset, bits):
    alpha = 2.75
    model = _qat_model(kind, alpha, bits, opset)
    onnx.checker.check_model(model)
    (found,) = pact.find_pact_clips(model)
    assert found.input == "x" and found.output == "y" and found.bits == bits
    assert found.alpha == pytest.approx(alpha)
    x = np.random.default_rng(0).normal(1.0, 2.0, (4, 64)).astype(np.float32)
    (y,) = ort_outputs(model, {"x": x})
    np.testing.assert_allclose(pact.fake_quantize(x, found.alpha, found.bits), y, rtol=1e-5, atol=1e-6)


def test_non_pact_patterns_are_ignored():
    model = _qat_model("clip", 2.0, 2)
    for t in model.graph.initializer:
        if t.name == "lo":
            t.CopyFrom(numpy_helper.from_array(np.array(-1.0, np.float32), "lo"))  # not a PACT clip
    assert pact.find_pact_clips(model) == []
    model = _qat_model("min", 2.0, 2)
    for t in model.graph.initializer:
        if t.name == "zp":
            t.CopyFrom(numpy_helper.from_array(np.array(7, np.uint8), "zp"))  # zero point != 0
    assert pact.find_pact_clips(model) == []
    model = _qat_model("clip", 2.0, 2)
    for t in model.graph.initializer:
        if t.name == "s":
            t.CopyFrom(numpy_helper.from_array(np.array(0.3, np.float32), "s"))  # 2 / 0.3 is not 2^k - 1
    (found,) = pact.find_pact_clips(model)
    assert found.alpha == pytest.approx(2.0) and found.bits is None
