"""Observers: the calibration statistic of one tensor, in memory that does not grow with the calibration set.

Activations are never stored (ONNX Runtime's entropy calibrater keeps growing histograms and can exhaust
memory on big models): every method but ``minmax`` keeps one fixed-size :class:`Histogram` and derives the
real range [lo, hi] from it.  The caller turns the range into a scale and zero point with
``scheme.activation_qparams``, which also widens it to include 0, so the searches below only consider
ranges that contain 0.

    observer = make_observer("entropy", bins=2048)
    for batch in batches:
        observer.update(batch)
    lo, hi = observer.range("uint8")
"""

from __future__ import annotations

import math

import numpy as np

from schedules.scheme import DTYPE_RANGES

from .pact import check_bits, optimal_alpha


class Histogram:
    """Counts on a zero-anchored grid of ``bins`` bins: bin i covers [(origin + i) * width, (origin + i + 1) * width).

    Growth: when data falls outside, the width is multiplied by the smallest power of two 2^k whose grid
    (still anchored at 0) covers all data seen; every old bin then lies inside exactly one new bin (old bin
    j goes to floor(j / 2^k)), so old counts merge exactly, without redistribution, and the count array keeps
    its size.  Because 0 is always an edge, each bin is wholly negative or wholly non-negative.

    Until data with any spread arrives, all values seen are equal (``min == max``) and no grid exists yet:
    a first all-zero batch does not fix a useless width.  The exact min, max and number of exact zeros
    are kept besides.
    """

    def __init__(self, bins: int = 2048):
        if int(bins) < 2:
            raise ValueError(f"a histogram needs at least 2 bins, got {bins}")
        self.counts = np.zeros(int(bins), np.int64)
        self.width = 0.0  # 0.0: no grid yet (no data, or all values equal)
        self.origin = 0  # grid index of bin 0 (a Python int)
        self.total = 0
        self.zeros = 0  # exact zeros (ReLU, padding): always representable, they never lose precision
        self.min = math.inf
        self.max = -math.inf

    @property
    def bins(self) -> int:
        return self.counts.size

    def add(self, array) -> None:
        values = np.asarray(array, np.float64).ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        lo, hi = min(self.min, float(values.min())), max(self.max, float(values.max()))
        if self.width == 0.0 and lo < hi:
            self._start(lo, hi)  # first spread: place the values seen so far (all equal to self.min)
        elif self.width > 0.0:
            self._grow(lo, hi)
        if self.width > 0.0:
            self.counts += np.bincount(self._index(values), minlength=self.bins)
        self.min, self.max, self.total = lo, hi, self.total + values.size
        self.zeros += int(np.count_nonzero(values == 0))

    def edges(self) -> np.ndarray:
        return (self.origin + np.arange(self.bins + 1)) * self.width

    def quantile(self, q: float) -> float:
        """numpy.percentile's value (rank q * (n - 1)), with each bin's values assumed evenly spread in it."""
        if self.width == 0.0:
            return self.min
        rank = q * (self.total - 1)
        cumulative = np.cumsum(self.counts)
        b = int(np.searchsorted(cumulative, rank, side="right"))
        b = min(b, self.bins - 1)
        before, count = cumulative[b] - self.counts[b], self.counts[b]
        if b == -self.origin and self.zeros:  # exact zeros sit at the left edge of the bin [0, width)
            if rank - before < self.zeros:
                return float(np.clip(0.0, self.min, self.max))
            before, count = before + self.zeros, count - self.zeros
        fraction = (rank - before + 0.5) / max(count, 1)
        return float(np.clip((self.origin + b + fraction) * self.width, self.min, self.max))

    def zero_view(self, max_bins: int | None = None) -> tuple[np.ndarray, int, float]:
        """(counts, z, width): the histogram padded with empty bins to reach 0, zero edge at index z.

        Data far from 0 would need a long padding: bins are then merged by powers of two (exact, as in
        growth) until the view has at most ``max_bins`` (default 4 * bins) bins.
        """
        max_bins = max_bins or 4 * self.bins
        counts, origin, width = self.counts, self.origin, self.width
        while max(origin + counts.size, 0) - min(origin, 0) > max_bins:
            start = origin // 2
            counts = np.bincount((origin + np.arange(counts.size)) // 2 - start, weights=counts).astype(np.int64)
            origin, width = start, width * 2
        first = min(origin, 0)
        view = np.zeros(max(origin + counts.size, 0) - first, np.int64)
        view[origin - first: origin - first + counts.size] = counts
        return view, -first, width

    def _start(self, lo: float, hi: float) -> None:
        # bins - 1.5 widths span [lo, hi]: from the bin containing lo, hi lands in the last bin at worst, with
        # half a bin to spare for rounding (the 2^-40 floor bounds origin for data far from 0)
        self.width = max((hi - lo) / (self.bins - 1.5), max(abs(lo), abs(hi)) * 2.0**-40)
        self.origin = math.floor(lo / self.width)
        if self.total:  # the values seen before: all equal to self.min
            self.counts[self._index(np.array([self.min]))] += self.total

    def _grow(self, lo: float, hi: float) -> None:
        first, last = math.floor(lo / self.width), math.floor(hi / self.width)
        if first >= self.origin and last < self.origin + self.bins:
            return
        k = 1
        while last // 2**k - min(first // 2**k, self.origin // 2**k) >= self.bins:
            k += 1
        origin = min(first // 2**k, self.origin // 2**k)
        old = (self.origin + np.arange(self.bins, dtype=object)) // 2**k - origin  # exact big-int arithmetic
        old = np.minimum(old.astype(np.int64), self.bins - 1)  # only empty old bins above the data go past the end
        self.counts = np.bincount(old, weights=self.counts, minlength=self.bins).astype(np.int64)
        self.origin, self.width = origin, self.width * 2**k

    def _index(self, values: np.ndarray) -> np.ndarray:
        index = np.floor(values / self.width) - self.origin
        return np.clip(index, 0, self.bins - 1).astype(np.int64)  # clip: float rounding at the top edge


class Observer:
    """The statistic of one tensor: ``update`` once per calibration batch, then ``range`` for the quantizer."""

    def update(self, array) -> None:
        raise NotImplementedError

    def range(self, dtype: str = "uint8") -> tuple[float, float]:
        raise NotImplementedError


def _levels(dtype: str) -> int:
    if dtype not in DTYPE_RANGES:
        raise ValueError(f"unknown activation dtype {dtype!r}; expected one of {sorted(DTYPE_RANGES)}")
    qmin, qmax = DTYPE_RANGES[dtype]
    return qmax - qmin + 1


class MinMaxObserver(Observer):
    """The exact running min and max: no clipping, no histogram."""

    def __init__(self):
        self.min, self.max = math.inf, -math.inf

    def update(self, array) -> None:
        values = np.asarray(array, np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            self.min, self.max = min(self.min, float(values.min())), max(self.max, float(values.max()))

    def range(self, dtype: str = "uint8") -> tuple[float, float]:
        _levels(dtype)
        if self.min > self.max:
            raise ValueError("no finite values observed: update() the observer with calibration data first")
        return self.min, self.max


class HistogramObserver(Observer):
    """Base of the histogram methods: they differ only in how ``_clip`` reads the histogram."""

    def __init__(self, bins: int = 2048):
        self.histogram = Histogram(bins)

    def update(self, array) -> None:
        self.histogram.add(array)

    def range(self, dtype: str = "uint8") -> tuple[float, float]:
        levels = _levels(dtype)
        h = self.histogram
        if h.total == 0:
            raise ValueError("no finite values observed: update() the observer with calibration data first")
        if h.width == 0.0:
            return h.min, h.max  # a constant tensor
        lo, hi = self._clip(levels)
        return max(float(lo), h.min), min(float(hi), h.max)

    def _clip(self, levels: int) -> tuple[float, float]:
        raise NotImplementedError


class PercentileObserver(HistogramObserver):
    """lo = the (100 - p)th percentile, hi = the pth: both tails of a signed tensor are clipped.

    (ONNX Runtime's symmetric variant takes one percentile of |x|; with asymmetric activations each tail
    gets its own.)  For non-negative data lo is the low percentile, >= 0; the quantizer widens it to 0.
    """

    def __init__(self, percentile: float = 99.99, bins: int = 2048):
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__(bins)
        self.percentile = float(percentile)

    def _clip(self, levels):
        q = self.percentile / 100.0
        return self.histogram.quantile(1.0 - q), self.histogram.quantile(q)


def _candidate_windows(view: np.ndarray, z: int):
    """(left, right) bin counts of the clipping windows [-left, right) around the zero edge z.

    The windows shrink the observed range [min(min, 0), max(max, 0)] about 0 by a common factor, keeping its
    asymmetry: [0, T] for non-negative data (TensorRT's one-sided search), [-T, T] for symmetric data.
    """
    nonzero = np.flatnonzero(view)
    left_max, right_max = max(z - int(nonzero[0]), 0), max(int(nonzero[-1]) + 1 - z, 0)
    longest = max(left_max, right_max)
    for i in range(1, longest + 1):
        yield round(i * left_max / longest), round(i * right_max / longest)


class EntropyObserver(HistogramObserver):
    """TensorRT's calibration: the clipping window minimizing KL(P || Q) over the histogram.

    P is the histogram inside the window with the clipped outliers added to its two end bins; Q merges the
    window's bins (without the outliers) into the dtype's 256 levels and spreads each level's count evenly
    over the level's bins where P is non-zero; Q's zeros where P > 0 become EPS (MXNet/ONNX Runtime smooth
    likewise).  Windows are [-left, right) bins around 0 (see ``_candidate_windows``: one search also covers
    signed tensors, on the histogram of the signed range), span at least 256 bins and hold at least half the
    data; when none qualifies (the data spans fewer bins) the range is the observed [min, max].

    Exact zeros (ReLU outputs) are left out of P and Q: the quantizer represents them exactly, and as a spike
    in the first bin they would otherwise dominate the divergence and pull the threshold far in.
    """

    EPS = 1e-4

    def _clip(self, levels):
        view, z, width = self.histogram.zero_view()
        counts = view.astype(np.float64)
        if self.histogram.zeros:  # exact zeros are quantized exactly: no divergence to weigh
            counts[z] -= self.histogram.zeros
        cumulative = np.concatenate([[0.0], np.cumsum(counts)])
        total = cumulative[-1]
        best, best_window = math.inf, None
        for left, right in _candidate_windows(view, z):
            size = left + right
            if size < levels:
                continue
            start, stop = z - left, z + right
            window = counts[start:stop]
            if 2 * window.sum() < total:
                continue  # a window that clips most of the data (possible when it is far from 0) is no candidate
            p = window.copy()
            p[0] += cumulative[start]
            p[-1] += total - cumulative[stop]
            level = np.arange(size) * levels // size
            nonzero = p > 0
            level_sum = np.bincount(level, weights=window, minlength=levels)
            level_nonzero = np.bincount(level, weights=nonzero, minlength=levels)
            q = np.maximum(level_sum[level] / np.maximum(level_nonzero[level], 1), self.EPS)[nonzero]
            p = p[nonzero] / total
            divergence = float(np.sum(p * np.log(p / (q / q.sum()))))
            if divergence < best:
                best, best_window = divergence, (left, right)
        if best_window is None:
            return self.histogram.min, self.histogram.max
        left, right = best_window
        return -left * width, right * width


class MSEObserver(HistogramObserver):
    """The range [-a, b] * width minimizing the expected squared error of quantize-dequantize.

    From the histogram: elements inside the range lose step^2 / 12 to rounding (step = (a + b) * width /
    (levels - 1)), except exact zeros, which the quantizer always represents; clipped elements lose their
    squared distance to the range end, taken from the bin centre, plus width^2 / 12 for their spread inside
    the bin.  a and b range independently over the bin edges from 0 out to the data (asymmetric
    activations): one vectorized row of b per a.
    """

    def _clip(self, levels):
        view, z, width = self.histogram.zero_view()
        counts = view.astype(np.float64)
        centres = (np.arange(counts.size) - z + 0.5) * width
        # prefix sums of n, n x, n x^2 (+ the in-bin variance) over the bins before each edge
        s0 = np.concatenate([[0.0], np.cumsum(counts)])
        s1 = np.concatenate([[0.0], np.cumsum(counts * centres)])
        s2 = np.concatenate([[0.0], np.cumsum(counts * (centres**2 + width**2 / 12))])
        nonzero = np.flatnonzero(view)
        a = np.arange(max(z - int(nonzero[0]), 0) + 1)  # lo = -a * width
        b = np.arange(max(int(nonzero[-1]) + 1 - z, 0) + 1)  # hi = b * width
        hi = b * width
        right_n, right_1, right_2 = s0[-1] - s0[z + b], s1[-1] - s1[z + b], s2[-1] - s2[z + b]
        right_error = right_2 - 2 * hi * right_1 + hi**2 * right_n
        best, best_range = math.inf, (self.histogram.min, self.histogram.max)
        for ai in a:
            lo = -ai * width
            left_error = s2[z - ai] - 2 * lo * s1[z - ai] + lo**2 * s0[z - ai]
            step = (ai + b) * width / (levels - 1)
            inside = s0[z + b] - s0[z - ai] - self.histogram.zeros
            error = left_error + right_error + inside * step**2 / 12
            if ai == 0:
                error[0] = math.inf  # the empty range
            j = int(np.argmin(error))
            if error[j] < best:
                best, best_range = float(error[j]), (lo, hi[j])
        return best_range


class PACTObserver(HistogramObserver):
    """Calibration method "pact": range (0, alpha) with the MSE-optimal alpha for ``bits``-bit codes.

    ``bits=None`` takes the bit width from the dtype passed to ``range`` (uint8: 8 bits), so the observer also
    serves the 8-bit flow; low-bit activations pass ``bits`` explicitly.
    """

    def __init__(self, bits: int | None = None, bins: int = 2048):
        super().__init__(bins)
        self.bits = None if bits is None else int(bits)
        if self.bits is not None:
            check_bits(self.bits)

    def alpha(self, bits: int | None = None) -> float:
        bits = bits or self.bits or 8
        return optimal_alpha(self.histogram, bits)

    def _clip(self, levels):
        bits = self.bits or int(round(math.log2(levels)))
        return 0.0, optimal_alpha(self.histogram, bits)


OBSERVERS = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}
METHODS = tuple(OBSERVERS)


def make_observer(method: str, **options) -> Observer:
    """A fresh observer of the named calibration method; options go to its constructor (e.g. bins=2048).

    "pact" (:class:`PACTObserver`, options bits=k, bins) is the PACT clip of non-negative low-bit activations;
    it is not in METHODS because it clips every negative value to 0 (the low-bit modes pick it per tensor)."""
    if method == "pact":
        return PACTObserver(**options)
    if method not in OBSERVERS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    return OBSERVERS[method](**options)
