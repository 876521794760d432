"""Streaming observers: per-tensor statistics that see each batch once and keep only a
few numbers and a bounded histogram, never the activations.

  * MinMaxObserver: exact running min and max.
  * MovingAverageMinMaxObserver(momentum): batch min/max, exponentially averaged
    (`avg = momentum * avg + (1 - momentum) * batch`; the first batch initialises).
  * HistogramObserver(bins): a histogram of `bins` equal bins on a grid aligned to 0
    (bin i covers [i*w, (i+1)*w)). When data falls outside, the bin width grows by an
    integer factor k and every k old bins merge exactly into one new bin, so the counts
    stay exact and memory stays `bins` integers. From it:
      - PercentileObserver(p): the range [q(1-p/100), q(p/100)] (two-sided quantiles,
        linear within a bin: within one bin of np.percentile);
      - EntropyObserver(bits): TensorRT's KL-divergence search over thresholds;
      - MSEObserver(bits): the threshold minimising the expected quantization MSE
        (clipping error of the tail + Delta^2/12 rounding noise inside).
    Entropy and MSE choose [0, T] for non-negative tensors (unsigned levels, 2^bits) and
    [-T, T] otherwise (signed levels, on the histogram of |x|). Both are vectorised over
    all candidate thresholds at once.

Observers take finite values only: `TensorObserver` drops and counts the rest.
Ranges are the data's; widening a range to include 0 is the quantizer's business.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np

__all__ = [
    "Histogram",
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PercentileObserver",
    "EntropyObserver",
    "MSEObserver",
    "TensorObserver",
    "percentile_range",
    "entropy_range",
    "mse_range",
]

Range = Tuple[float, float]
_CHUNK = 1 << 20  # elements binned at a time: bounds the float64/index temporaries


class MinMaxObserver:
    """Exact running minimum and maximum."""

    def __init__(self) -> None:
        self.min: Optional[float] = None
        self.max: Optional[float] = None

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)

    def range(self) -> Optional[Range]:
        return None if self.min is None else (self.min, self.max)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max."""

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if self.min is None:
            self.min, self.max = lo, hi
        else:
            m = self.momentum
            self.min = m * self.min + (1 - m) * lo
            self.max = m * self.max + (1 - m) * hi


class Histogram:
    """Counts of `len(counts)` bins of width `width`; bin j covers
    [(lo + j) * width, (lo + j + 1) * width) (`lo` an integer grid index)."""

    def __init__(self, counts: np.ndarray, lo: int, width: float):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.lo = int(lo)
        self.width = float(width)

    @property
    def edges(self) -> np.ndarray:
        return (self.lo + np.arange(len(self.counts) + 1)) * self.width

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def to_dict(self) -> Dict:
        nz = np.flatnonzero(self.counts)
        first, last = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
        return {"bins": len(self.counts), "lo": self.lo, "width": self.width, "first": first,
                "counts": self.counts[first:last].tolist()}

    @classmethod
    def from_dict(cls, d: Dict) -> "Histogram":
        counts = np.zeros(int(d["bins"]), dtype=np.int64)
        first = int(d["first"])
        counts[first:first + len(d["counts"])] = d["counts"]
        return cls(counts, int(d["lo"]), float(d["width"]))

    def magnitude(self, max_bins: int) -> Tuple[np.ndarray, float, bool]:
        """(counts, width, signed): the histogram of x over [0, n*width) when all data
        is >= 0, else of |x| (negative bins folded onto positive ones, exactly, since the
        grid is aligned to 0); merged by an integer factor to at most `max_bins` bins."""
        idx = self.lo + np.arange(len(self.counts))
        used = self.counts > 0
        signed = bool(used.any() and idx[used].min() < 0)
        mag = np.where(idx >= 0, idx, -idx - 1)
        counts = np.bincount(mag, weights=self.counts, minlength=int(mag.max()) + 1)
        factor = max(1, math.ceil(len(counts) / max_bins))
        if factor > 1:
            pad = (-len(counts)) % factor
            counts = np.concatenate([counts, np.zeros(pad)]).reshape(-1, factor).sum(axis=1)
        last = np.flatnonzero(counts)
        counts = counts[: int(last[-1]) + 1] if len(last) else counts[:1]
        return counts.astype(np.float64), self.width * factor, signed


class HistogramObserver(MinMaxObserver):
    """A histogram of at most `bins` bins that widens (merging bins exactly) as data
    arrives outside its range; also tracks the exact min and max."""

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        if bins < 16:
            raise ValueError(f"a histogram needs at least 16 bins, got {bins}")
        self.bins = bins
        self.hist: Optional[Histogram] = None

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        super().update(x)
        self._cover(self.min, self.max)
        h = self.hist
        flat = x.reshape(-1)
        inv = 1.0 / h.width
        for start in range(0, flat.size, _CHUNK):
            q = np.multiply(flat[start:start + _CHUNK], inv, dtype=np.float64)
            np.floor(q, out=q)
            q -= h.lo
            np.clip(q, 0, self.bins - 1, out=q)
            h.counts += np.bincount(q.astype(np.intp), minlength=self.bins)

    def _cover(self, lo: float, hi: float) -> None:
        """Make the histogram cover [lo, hi], creating or widening it."""
        b = self.bins
        if self.hist is None:
            span = hi - lo
            if span <= 0:
                span = max(abs(lo), 1e-12)
            w = span / (b - 2)  # floor(lo/w) .. floor(hi/w) spans at most b bins
            self.hist = Histogram(np.zeros(b, dtype=np.int64), math.floor(lo / w), w)
            self._cover(lo, hi)  # rounding: widen if needed
            return
        h = self.hist
        cur_lo, cur_hi = h.lo * h.width, (h.lo + b) * h.width
        if lo >= cur_lo and hi < cur_hi:
            return
        lo, hi = min(lo, cur_lo), max(hi, cur_hi)
        k = max(2, math.ceil((hi - lo) / (h.width * (b - 2))))
        while True:
            w = h.width * k
            new_lo = math.floor(lo / w)
            if new_lo * w <= lo and math.floor(hi / w) < new_lo + b:
                break
            k += 1
        old = h.lo + np.arange(b)
        new_index = np.floor_divide(old, k) - new_lo
        counts = np.bincount(new_index, weights=h.counts, minlength=b)
        self.hist = Histogram(np.rint(counts).astype(np.int64), new_lo, w)


class PercentileObserver(HistogramObserver):
    """Range from two-sided percentiles of the histogram."""

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(bins)
        self.percentile = percentile

    def range(self) -> Optional[Range]:
        return None if self.hist is None else percentile_range(self.hist, self.percentile, (self.min, self.max))


class EntropyObserver(HistogramObserver):
    """Range minimising the KL divergence between the clipped and quantized histogram."""

    def __init__(self, bits: int = 8, bins: int = 2048) -> None:
        super().__init__(bins)
        self.bits = bits

    def range(self) -> Optional[Range]:
        return None if self.hist is None else entropy_range(self.hist, self.bits)


class MSEObserver(HistogramObserver):
    """Range minimising the expected quantization mean squared error at `bits` bits."""

    def __init__(self, bits: int = 8, bins: int = 2048) -> None:
        super().__init__(bins)
        self.bits = bits

    def range(self) -> Optional[Range]:
        return None if self.hist is None else mse_range(self.hist, self.bits)


# -- ranges from a histogram -----------------------------------------------------------

def percentile_range(hist: Histogram, percentile: float, bounds: Optional[Range] = None) -> Range:
    """[q(1 - p/100), q(p/100)] with linear interpolation inside the bin, clamped to
    `bounds` (the exact min and max) when given."""
    p = percentile / 100.0
    lo_q, hi_q = sorted((1.0 - p, p))
    cdf = np.cumsum(hist.counts, dtype=np.float64)
    total = cdf[-1]
    edges = hist.edges

    def quantile(q: float) -> float:
        target = q * (total - 1) + 0.5  # numpy's rank q*(n-1), at the middle of its element
        j = int(np.searchsorted(cdf, target, side="left"))
        j = min(j, len(cdf) - 1)
        before = cdf[j - 1] if j else 0.0
        inside = hist.counts[j]
        frac = (target - before) / inside if inside else 0.0
        return float(edges[j] + frac * (edges[j + 1] - edges[j]))

    lo, hi = quantile(lo_q), quantile(hi_q)
    if bounds is not None and bounds[0] is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return lo, hi


def _magnitude_range(t: float, signed: bool) -> Range:
    return (-t, t) if signed else (0.0, t)


def entropy_range(hist: Histogram, bits: int = 8, max_bins: int = 2048) -> Range:
    """TensorRT's entropy calibration: over thresholds i (in bins of the magnitude
    histogram), the KL divergence between the histogram clipped at i (outliers added to
    the last bin) and its quantization into `levels` groups (spread evenly over each
    group's non-empty bins); the threshold with the least divergence wins."""
    h, w, signed = hist.magnitude(max_bins)
    levels = 2 ** (bits - 1) if signed else 2 ** bits
    n = len(h)
    if n <= levels:  # coarser than the quantization grid: nothing to gain by clipping
        return _magnitude_range(n * w, signed)
    with np.errstate(divide="ignore", invalid="ignore"):
        hlogh = np.where(h > 0, h * np.log(np.where(h > 0, h, 1)), 0.0)
    cs = np.concatenate([[0.0], np.cumsum(h)])
    cnz = np.concatenate([[0.0], np.cumsum(h > 0)])
    chl = np.concatenate([[0.0], np.cumsum(hlogh)])
    total = cs[-1]
    t = np.arange(levels, n + 1)  # candidate thresholds, in bins
    bounds = (np.arange(levels + 1)[None, :] * t[:, None]) // levels  # (T, levels+1)
    s = np.diff(cs[bounds], axis=1)  # group sums
    nz = np.diff(cnz[bounds], axis=1)  # non-empty bins per group
    outliers = total - cs[t]
    last = h[t - 1]
    q_total = cs[t]
    with np.errstate(divide="ignore", invalid="ignore"):
        per_bin = np.where(nz > 0, s / np.maximum(nz, 1), 1.0)
        log_q = np.log(np.where(per_bin > 0, per_bin, 1.0))
        # sum over bins of h' log h' (h' = h with the outliers in the last bin)
        last_new = last + outliers
        hl = chl[t] - _xlogx(last) + _xlogx(last_new)
        # sum over bins of h' log q_bin: groups' own mass, plus the outliers on the last bin
        cross = (s * log_q).sum(axis=1)
        eps_log = np.log(1e-4 * q_total / t)  # smoothing when the last bin itself is empty
        cross = cross + outliers * np.where(last > 0, log_q[:, -1], eps_log)
        kl = (hl - cross) / total - np.log(total) + np.log(q_total)
    kl = np.where(np.isfinite(kl), kl, np.inf)
    best = int(t[int(np.argmin(kl))])
    return _magnitude_range(best * w, signed)


def _xlogx(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1)), 0.0)


def mse_range(hist: Histogram, bits: int = 8, max_bins: int = 1024) -> Range:
    """The range [lo, hi] (bin edges, lo <= 0 <= hi) minimising the expected squared
    error of asymmetric quantization to 2^bits levels, as activations are quantized
    (a zero point, the range widened to hold 0):
        sum_{x < lo} (lo - x)^2 + sum_{x > hi} (x - hi)^2 + N_inside * Delta^2 / 12,
    Delta = (hi - lo) / (2^bits - 1); bins are represented by their centres. A symmetric
    [-T, T] would spend half the levels on the short side of a skewed tensor (a
    residual sum, a Conv output before its activation). All (lo, hi) pairs of the
    histogram merged to at most `max_bins` bins (0 stays an edge) are tried at once."""
    counts, first = hist.counts.astype(np.float64), hist.lo
    factor = max(1, math.ceil(len(counts) / max_bins))
    if factor > 1:  # merge by `factor`, the grid still aligned to 0
        front = first % factor
        counts = np.concatenate([np.zeros(front), counts, np.zeros((-(front + len(counts))) % factor)])
        counts, first = counts.reshape(-1, factor).sum(axis=1), (first - front) // factor
    width = hist.width * factor
    used = np.flatnonzero(counts)
    if not len(used):
        return 0.0, 0.0
    counts = counts[used[0]:used[-1] + 1]
    first += int(used[0])
    edges = (first + np.arange(len(counts) + 1)) * width
    centres = (edges[:-1] + edges[1:]) / 2
    # prefix sums over the bins below edge i, suffix sums over the bins above edge k
    p0, p1, p2 = (np.concatenate([[0.0], np.cumsum(counts * centres ** m)]) for m in (0, 1, 2))
    total0, total1, total2 = p0[-1], p1[-1], p2[-1]
    lows = np.flatnonzero(edges <= 0) if edges[0] <= 0 else np.array([0])
    highs = np.flatnonzero(edges >= 0) if edges[-1] >= 0 else np.array([len(edges) - 1])
    lo_e, hi_e = np.minimum(edges[lows], 0.0), np.maximum(edges[highs], 0.0)
    clip_lo = p2[lows] - 2 * lo_e * p1[lows] + lo_e ** 2 * p0[lows]
    t0, t1, t2 = total0 - p0[highs], total1 - p1[highs], total2 - p2[highs]
    clip_hi = t2 - 2 * hi_e * t1 + hi_e ** 2 * t0
    inside = total0 - p0[lows][:, None] - t0[None, :]
    delta = (hi_e[None, :] - lo_e[:, None]) / (2 ** bits - 1)
    cost = clip_lo[:, None] + clip_hi[None, :] + inside * delta ** 2 / 12.0
    i, k = np.unravel_index(int(np.argmin(cost)), cost.shape)
    return float(lo_e[i]), float(hi_e[k])


# -- the per-tensor bundle -------------------------------------------------------------

class TensorObserver:
    """Everything calibration records for one tensor: exact and moving-average min/max,
    a histogram, the number of finite values and of excluded ones (NaN, +-inf, and
    |x| >= `mask_threshold`, the fill values of attention masks)."""

    def __init__(self, bins: int = 2048, momentum: float = 0.9, mask_threshold: float = 1e9):
        self.hist = HistogramObserver(bins)
        self.moving = MovingAverageMinMaxObserver(momentum)
        self.mask_threshold = mask_threshold
        self.count = 0
        self.nonfinite = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.dtype.kind != "f":
            return
        keep = np.abs(x) < self.mask_threshold  # False for NaN and inf too
        if not keep.all():
            self.nonfinite += int(x.size - np.count_nonzero(keep))
            x = x[keep]
        self.count += int(x.size)
        self.hist.update(x)
        self.moving.update(x)
