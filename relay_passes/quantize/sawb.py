"""SAWB: statistics-aware weight binning (Choi et al., SysML 2019) for low-bit weights.

The clipping scale of a weight tensor is predicted from two statistics,

    alpha* = c1 * sqrt(E[w^2]) - c2 * E[|w|]        (E[w^2] the raw second moment, not the variance),

with (c1, c2) fitted once per bit width by linear regression of the MSE-optimal alpha over a family of
distributions (:func:`fit_coefficients` redoes that fit).  The weights are then quantized to ``n`` uniform
symmetric levels on [-alpha, alpha] with no zero level for even ``n``: level(c) = alpha * (2c - (n-1)) / (n-1),
code c in 0..n-1 (2 bits: {-alpha, -alpha/3, alpha/3, alpha}).  The integer ``2c - (n-1)`` is odd for even
``n``, so a kernel multiplying codes by ``scale = alpha / (n-1)`` is exact in integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# (c1, c2) per bit width, from the public SAWB implementations (papers.md); "ternary" = 3 levels with zero.
COEFFICIENTS = {
    "ternary": (2.587, 1.693),
    2: (3.212, 2.178),
    3: (7.509, 6.892),
    4: (12.68, 12.80),
    5: (17.74, 18.64),
    8: (31.76, 35.04),
}
# Alternative tables, selected with ``table=``: IBM's later refit of the 2-bit pair.
REFITS = {"ibm": {2: (3.12, 2.064)}}


def levels(bits) -> int:
    """Number of quantization levels: 2^bits, or 3 for ``"ternary"``."""
    if bits == "ternary":
        return 3
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 16:
        raise ValueError(f"SAWB bit width must be 1..16 or 'ternary', got {bits!r}")
    return 2 ** int(bits)


def coefficients(bits, table: str = "published") -> tuple[float, float] | None:
    """(c1, c2) for a bit width; None for 1 bit, whose scale is E[|w|] (the binary-weight optimum)."""
    levels(bits)
    if bits == 1:
        return None
    if table != "published":
        if table not in REFITS:
            raise ValueError(f"unknown SAWB table {table!r}; expected 'published' or one of {sorted(REFITS)}")
        if bits in REFITS[table]:
            return REFITS[table][bits]
    if bits not in COEFFICIENTS:
        raise ValueError(f"no SAWB coefficients for {bits} bits; known: {list(COEFFICIENTS)} (fit_coefficients "
                         "computes a pair for any width)")
    return COEFFICIENTS[bits]


def _moments(w: np.ndarray, axis: int | None):
    w = np.asarray(w, np.float64)
    if axis is None:
        return np.sqrt(np.mean(w * w)), np.mean(np.abs(w))
    axis = axis % w.ndim
    reduce = tuple(d for d in range(w.ndim) if d != axis)
    return np.sqrt(np.mean(w * w, axis=reduce)), np.mean(np.abs(w), axis=reduce)


def alpha(w, bits=2, axis: int | None = None, table: str = "published", pair: tuple[float, float] | None = None):
    """SAWB clipping scale, per tensor (``axis=None``) or per channel along ``axis`` (statistics over the rest).

    ``pair`` overrides the table (e.g. a pair from :func:`fit_coefficients`).  A channel whose prediction is
    not positive (impossible for real data: c1 * rms > c2 * mean|w| for every published pair) falls back to
    its max |w|; an all-zero channel gets alpha 1 (any scale represents it).
    """
    rms, mean_abs = _moments(w, axis)
    c = pair if pair is not None else coefficients(bits, table)
    a = mean_abs if c is None else c[0] * rms - c[1] * mean_abs
    w64 = np.asarray(w, np.float64)
    if axis is None:
        peak = np.max(np.abs(w64)) if w64.size else 0.0
    else:
        peak = np.max(np.abs(np.moveaxis(w64, axis, 0)).reshape(w64.shape[axis], -1), axis=1)
    a = np.where(a > 0, a, peak)
    return np.where(a > 0, a, 1.0)


def _broadcast(a, w: np.ndarray, axis: int | None):
    a = np.asarray(a, np.float64)
    if axis is None or a.ndim == 0:
        return a
    shape = [1] * w.ndim
    shape[axis % w.ndim] = -1
    return a.reshape(shape)


def quantize(w, a, bits=2, axis: int | None = None) -> np.ndarray:
    """Codes c in 0..n-1 (uint8): round((clip(w, -a, a) / a + 1) / 2 * (n - 1))."""
    n = levels(bits)
    w = np.asarray(w, np.float64)
    a = _broadcast(a, w, axis)
    codes = np.round((np.clip(w / a, -1.0, 1.0) + 1.0) / 2.0 * (n - 1))
    return codes.astype(np.uint8 if n <= 256 else np.uint16)


def integer_levels(codes, bits=2) -> np.ndarray:
    """The integer weights 2c - (n-1) of codes (odd for even n: 2 bits -> {-3, -1, 1, 3}), int32."""
    n = levels(bits)
    return 2 * np.asarray(codes, np.int32) - (n - 1)


def dequantize(codes, a, bits=2, axis: int | None = None) -> np.ndarray:
    """Real weights a * (2c - (n-1)) / (n-1), float32."""
    n = levels(bits)
    ints = integer_levels(codes, bits).astype(np.float64)
    return (ints * _broadcast(a, ints, axis) / (n - 1)).astype(np.float32)


def fake_quantize(w, bits=2, axis: int | None = None, table: str = "published") -> np.ndarray:
    """dequantize(quantize(w)) with the SAWB alpha: what the quantized weights compute, as floats."""
    a = alpha(w, bits, axis, table)
    return dequantize(quantize(w, a, bits, axis), a, bits, axis)


@dataclass(frozen=True)
class SAWBWeights:
    """A weight tensor quantized with SAWB: codes, per-channel (or scalar) alpha, bit width, channel axis."""

    codes: np.ndarray
    alpha: np.ndarray
    bits: object
    axis: int | None

    @property
    def scale(self) -> np.ndarray:
        """Real value of one integer step: weight = scale * (2c - (n-1))."""
        return np.asarray(self.alpha, np.float64) / (levels(self.bits) - 1)

    def integers(self) -> np.ndarray:
        return integer_levels(self.codes, self.bits)

    def dequantize(self) -> np.ndarray:
        return dequantize(self.codes, self.alpha, self.bits, self.axis)


def quantize_weights(w, bits=2, axis: int | None = 0, table: str = "published") -> SAWBWeights:
    """SAWB-quantize a weight tensor, per output channel along ``axis`` (None: per layer)."""
    a = alpha(w, bits, axis, table)
    return SAWBWeights(quantize(w, a, bits, axis), np.asarray(a, np.float64), bits, axis)


# ---------------------------------------------------------------------------------------------- the fit
def _distributions():
    """Zero-mean distribution family of the regression (scipy frozen distributions; scale is irrelevant)."""
    from scipy import stats

    return {
        "gaussian": stats.norm(),
        "uniform": stats.uniform(-1.0, 2.0),
        "laplace": stats.laplace(),
        "logistic": stats.logistic(),
        "triangular": stats.triang(0.5, loc=-1.0, scale=2.0),
        "von_mises_k1": stats.vonmises(1.0),
        "von_mises_k4": stats.vonmises(4.0),
        "student_t5": stats.t(5),
        "cosine": stats.cosine(),
    }


DISTRIBUTIONS = tuple(_distributions())


def _density_grid(dist, points: int):
    """Quadrature nodes and weights of a symmetric distribution over its support (tails beyond 1e-10 cut)."""
    lo, hi = dist.support()
    lo, hi = max(lo, dist.ppf(1e-10)), min(hi, dist.ppf(1 - 1e-10))
    x = np.linspace(lo, hi, points)
    p = dist.pdf(x)
    p = p / p.sum()
    return x, p


def quantization_mse(x, p, a, bits) -> float:
    """E[(Q_a(w) - w)^2] over the weighted nodes (x, p) for the SAWB quantizer with scale a."""
    q = dequantize(quantize(x, a, bits), a, bits).astype(np.float64)
    return float(np.sum(p * (q - x) ** 2))


def optimal_alpha(dist, bits=2, points: int = 20001) -> float:
    """The MSE-optimal alpha for a distribution: a coarse sweep over alpha / rms, then a bounded refinement."""
    from scipy.optimize import minimize_scalar

    x, p = _density_grid(dist, points)
    rms = float(np.sqrt(np.sum(p * x * x)))
    grid = np.linspace(0.05, 12.0, 240) * rms
    grid = grid[grid <= np.max(np.abs(x))]
    errors = [quantization_mse(x, p, a, bits) for a in grid]
    i = int(np.argmin(errors))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    res = minimize_scalar(lambda a: quantization_mse(x, p, a, bits), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-6 * rms})
    return float(res.x)


@dataclass(frozen=True)
class Fit:
    """Result of :func:`fit_coefficients`: the pair, its fit quality and the per-distribution points."""

    c1: float
    c2: float
    r2: float  # of alpha / rms regressed on E|w| / rms
    max_rel_error: float  # max over distributions of |alpha_pred - alpha_opt| / alpha_opt
    points: dict  # name -> (rms, mean_abs, optimal alpha)

    @property
    def pair(self) -> tuple[float, float]:
        return self.c1, self.c2


def fit_coefficients(bits=2, distributions=None, points: int = 20001) -> Fit:
    """Refit SAWB's (c1, c2): least squares of the MSE-optimal alpha on (rms, -E|w|) over ``distributions``.

    ``distributions`` maps names to scipy frozen distributions (zero mean); default: :data:`DISTRIBUTIONS`.
    Moments and errors are computed by quadrature of the density, so the fit is deterministic.  Because the
    model is homogeneous (alpha scales with w), each distribution contributes one point
    (E|w|/rms, alpha*/rms) and the regression is the line alpha*/rms = c1 - c2 * E|w|/rms.
    """
    dists = distributions if distributions is not None else _distributions()
    if len(dists) < 2:
        raise ValueError("fit_coefficients needs at least two distributions")
    data = {}
    for name, dist in dists.items():
        x, p = _density_grid(dist, points)
        rms = float(np.sqrt(np.sum(p * x * x)))
        mean_abs = float(np.sum(p * np.abs(x)))
        data[name] = (rms, mean_abs, optimal_alpha(dist, bits, points))
    rms, mean_abs, best = (np.array(v) for v in zip(*data.values()))
    ratio, target = mean_abs / rms, best / rms
    design = np.stack([np.ones_like(ratio), -ratio], axis=1)
    (c1, c2), *_ = np.linalg.lstsq(design, target, rcond=None)
    pred = design @ np.array([c1, c2])
    ss_res, ss_tot = float(np.sum((target - pred) ** 2)), float(np.sum((target - target.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return Fit(float(c1), float(c2), r2, float(np.max(np.abs(pred - target) / target)), data)
