"""Calibration observers: exact statistics, bounded memory, and ranges that quantize well."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schedules import scheme
from relay_passes.quantize.observers import METHODS, Histogram, make_observer

HISTOGRAM_METHODS = [m for m in METHODS if m != "minmax"]


def observe(method, batches, **options):
    observer = make_observer(method, **options)
    for batch in batches:
        observer.update(batch)
    return observer


def quantization_mse(data, value_range, dtype="uint8"):
    """Mean squared error of quantize -> dequantize with the parameters scheme derives from the range."""
    qp = scheme.activation_qparams(*value_range, dtype)
    restored = scheme.dequantize(scheme.quantize(data, qp), qp).astype(np.float64)
    return float(np.mean((restored - data) ** 2))


def growing_batches(rng, count=20, size=5000):
    """Gaussian batches whose spread grows 50-fold: the histogram must widen several times."""
    return [(rng.standard_normal(size) * scale + 0.3).astype(np.float32) for scale in np.geomspace(0.1, 5, count)]


def test_registry():
    assert set(METHODS) == {"minmax", "percentile", "entropy", "mse"}
    with pytest.raises(ValueError, match="minmax.*percentile.*entropy.*mse"):
        make_observer("kl")
    with pytest.raises(ValueError, match="percentile"):
        make_observer("percentile", percentile=30)
    with pytest.raises(ValueError, match="dtype"):
        observe("minmax", [np.ones(3)]).range("int4")


@pytest.mark.parametrize("method", METHODS)
def test_no_data_is_an_error(method):
    observer = observe(method, [np.full(4, np.nan, np.float32)])
    with pytest.raises(ValueError, match="no finite values"):
        observer.range("uint8")


def test_minmax_exact():
    rng = np.random.default_rng(0)
    batches = growing_batches(rng) + [rng.standard_normal((2, 3, 4, 5)).astype(np.float32) * 100]
    data = np.concatenate([b.ravel() for b in batches])
    assert observe("minmax", batches).range("uint8") == (float(data.min()), float(data.max()))
    assert observe("minmax", batches).range("int8") == (float(data.min()), float(data.max()))


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.99])
def test_percentile_within_one_bin_of_numpy(percentile):
    rng = np.random.default_rng(1)
    batches = growing_batches(rng)
    data = np.concatenate(batches)
    observer = observe("percentile", batches, percentile=percentile)
    lo, hi = observer.range("uint8")
    width = observer.histogram.width
    assert abs(lo - np.percentile(data, 100 - percentile)) <= width
    assert abs(hi - np.percentile(data, percentile)) <= width


def test_entropy_clips_outliers():
    rng = np.random.default_rng(2)
    data = rng.standard_normal(200_000).astype(np.float32)
    data[:6] = [60, -55, 48, 52, -40, 45]  # a few huge outliers
    bulk = data[6:]
    lo, hi = observe("entropy", np.array_split(data, 10)).range("uint8")
    assert 3 < hi < 0.25 * data.max() and 0.25 * data.min() < lo < -3
    minmax = observe("minmax", [data]).range("uint8")
    assert quantization_mse(bulk, (lo, hi)) < 0.1 * quantization_mse(bulk, minmax)


def test_entropy_relu_is_one_sided():
    rng = np.random.default_rng(3)
    data = np.maximum(rng.laplace(size=100_000), 0).astype(np.float32)
    lo, hi = observe("entropy", [data]).range("uint8")
    assert lo == 0.0 and 0.2 * data.max() < hi <= data.max()


def brute_force_mse(data, signed: bool) -> float:
    """The best quantization MSE over clipping thresholds: symmetric [-t, t] (or [0, t] when non-negative)
    and the observed range shrunk about 0 by a common factor."""
    lo, hi = float(data.min()), float(data.max())
    amax = max(-lo, hi)
    candidates = [(t * lo, t * hi) for t in np.linspace(0.02, 1, 300)]
    if signed:
        candidates += [(-t * amax, t * amax) for t in np.linspace(0.02, 1, 300)]
    return min(quantization_mse(data, c) for c in candidates)


@pytest.mark.parametrize("distribution", ["normal", "laplace", "relu_laplace", "exponential"])
def test_mse_matches_brute_force(distribution):
    rng = np.random.default_rng(4)
    data = {
        "normal": lambda: rng.standard_normal(50_000),
        "laplace": lambda: rng.laplace(size=50_000),
        "relu_laplace": lambda: np.maximum(rng.laplace(size=50_000), 0),
        "exponential": lambda: rng.exponential(size=50_000) - 0.5,
    }[distribution]().astype(np.float32)
    value_range = observe("mse", np.array_split(data, 5)).range("uint8")
    assert quantization_mse(data, value_range) <= 1.01 * brute_force_mse(data, data.min() < 0)


def test_growth_matches_one_update():
    rng = np.random.default_rng(5)
    batches = growing_batches(rng)
    data = np.concatenate(batches)
    assert observe("minmax", batches).range("uint8") == observe("minmax", [data]).range("uint8")
    for percentile in (99.0, 99.99):
        stepwise = observe("percentile", batches, percentile=percentile)
        at_once = observe("percentile", [data], percentile=percentile)
        tolerance = stepwise.histogram.width + at_once.histogram.width
        np.testing.assert_allclose(stepwise.range("uint8"), at_once.range("uint8"), atol=tolerance)


@settings(max_examples=30, deadline=None)
@given(scales=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=8),
       offsets=st.lists(st.floats(-10, 10), min_size=8, max_size=8), seed=st.integers(0, 2**16),
       bins=st.sampled_from([2, 7, 64, 2048]))
def test_histogram_merges_exactly(scales, offsets, seed, bins):
    """Widening by powers of two loses nothing: the counts equal binning all the data on the final grid."""
    rng = np.random.default_rng(seed)
    batches = [(rng.standard_normal(50) * s + o).astype(np.float32) for s, o in zip(scales, offsets)]
    histogram = Histogram(bins)
    for batch in batches:
        histogram.add(batch)
    data = np.concatenate(batches).astype(np.float64)
    assert histogram.counts.size == bins and histogram.total == data.size
    assert (histogram.min, histogram.max) == (data.min(), data.max())
    if data.min() < data.max():
        direct = np.floor(data / histogram.width) - histogram.origin
        assert direct.min() >= 0 and direct.max() < bins
        np.testing.assert_array_equal(histogram.counts, np.bincount(direct.astype(np.int64), minlength=bins))
        edges = histogram.edges()
        assert edges[0] <= data.min() and data.max() < edges[-1]


@pytest.mark.parametrize("method", HISTOGRAM_METHODS)
def test_memory_does_not_grow(method):
    rng = np.random.default_rng(6)
    once = observe(method, [rng.standard_normal(1000).astype(np.float32)])
    many = observe(method, [rng.standard_normal(1000).astype(np.float32) * (1 + i) for i in range(200)])
    assert many.histogram.counts.nbytes == once.histogram.counts.nbytes == 2048 * 8
    assert many.histogram.total == 200 * 1000


@pytest.mark.parametrize("method", METHODS)
def test_nan_and_inf_are_ignored(method):
    rng = np.random.default_rng(7)
    clean = rng.standard_normal(10_000).astype(np.float32)
    dirty = clean.copy()
    dirty[rng.choice(dirty.size, 50, replace=False)] = [np.nan, np.inf, -np.inf, np.nan, np.inf] * 10
    keep = np.isfinite(dirty)
    assert observe(method, [dirty]).range("uint8") == observe(method, [dirty[keep]]).range("uint8")
    assert all(np.isfinite(observe(method, [dirty]).range("int8")))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_all_zero_tensor(method, dtype):
    lo, hi = observe(method, [np.zeros((4, 8), np.float32)] * 3).range(dtype)
    assert (lo, hi) == (0.0, 0.0)
    qp = scheme.activation_qparams(lo, hi, dtype)
    assert float(qp.scale) > 0 and qp.qmin <= int(qp.zero_point) <= qp.qmax
    assert scheme.dequantize(scheme.quantize(np.zeros(3), qp), qp).tolist() == [0.0] * 3


@pytest.mark.parametrize("method", METHODS)
def test_zeros_first_then_data(method):
    """A dead first batch must not fix the histogram's resolution."""
    rng = np.random.default_rng(8)
    data = rng.standard_normal(20_000).astype(np.float32)
    lo, hi = observe(method, [np.zeros(1000, np.float32), data]).range("uint8")
    assert -5 < lo < -2 and 2 < hi < 5


@pytest.mark.parametrize("method", METHODS)
def test_relu_data(method):
    rng = np.random.default_rng(9)
    batches = [np.maximum(rng.standard_normal((8, 16, 16)), 0).astype(np.float32) * (1 + i / 4) for i in range(8)]
    data = np.concatenate([b.ravel() for b in batches])
    lo, hi = observe(method, batches).range("uint8")
    assert 0.0 <= lo <= 1e-6 and 0.5 * np.percentile(data, 99) < hi <= data.max()
    assert quantization_mse(data, (lo, hi)) < 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_positive_offset_data(method):
    """Data far from 0 (the quantizer includes 0 anyway): ranges stay inside the observed one."""
    rng = np.random.default_rng(10)
    data = (rng.standard_normal(10_000) + 100).astype(np.float32)
    lo, hi = observe(method, [data]).range("uint8")
    assert data.min() <= lo <= hi <= data.max() and hi > 100
