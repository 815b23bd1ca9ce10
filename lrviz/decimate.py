"""Drawing long series fast: a min/max level-of-detail pyramid and a debiased EMA, in NumPy.

Pure NumPy (no Qt), so the plotting code's arithmetic can be tested on its own.

:class:`PeakPyramid` keeps, for an append-only series, the minimum and maximum of every block of
``factor**k`` consecutive values (k = 1, 2, ...). It is updated with only the new values, and answers
"the points to draw for rows ``i0:i1`` at ``width`` pixels" with at most ~2 points per pixel column:
the minimum and maximum of each block, so a one-step spike stays visible at any zoom.

:class:`EmaSmoother` is TensorBoard's smoothing (an exponential moving average, debiased so that the
first values are not pulled towards 0), computed incrementally and without a Python loop per value.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["EmaSmoother", "GrowableArray", "PeakPyramid", "ema_debiased"]


class GrowableArray:
    """A 1-D float array that grows by ``growth`` (default doubling); ``data`` is a view of the filled part."""

    def __init__(self, capacity: int = 1024, dtype: np.dtype | type = np.float64, growth: float = 2.0):
        self._a = np.empty(max(16, capacity), dtype)
        self.n = 0
        self.growth = max(1.1, float(growth))

    def __len__(self) -> int:
        return self.n

    @property
    def data(self) -> np.ndarray:
        return self._a[: self.n]

    def extend(self, values: np.ndarray) -> None:
        k = len(values)
        if not k:
            return
        need = self.n + k
        if need > len(self._a):
            cap = len(self._a)
            while cap < need:
                cap = int(cap * self.growth) + 16
            a = np.empty(cap, self._a.dtype)
            a[: self.n] = self._a[: self.n]
            self._a = a
        self._a[self.n : need] = values
        self.n = need

    def clear(self) -> None:
        self.n = 0


class PeakPyramid:
    """Min/max of blocks of ``factor**k`` values of an append-only series, for k = 1, 2, ...

    Feed it the new values with :meth:`extend`; it keeps the block minima and maxima (about
    ``2 / (factor - 1)`` times the series' length) plus fewer than ``factor`` raw values, not the
    series itself. :meth:`query` answers with at most ~2 points per pixel column; when the raw
    values fit it asks the caller for them. Non-finite values are ignored by min/max unless a
    block holds nothing else.
    """

    def __init__(self, factor: int = 4, dtype: np.dtype | type = np.float64, growth: float = 2.0):
        if factor < 2:
            raise ValueError("factor must be >= 2")
        self.factor = factor
        #: Block minima and maxima are kept in this dtype (float32 halves the memory; a spike stays a spike).
        self.dtype = np.dtype(dtype)
        self.growth = growth
        self.count = 0  # values folded in
        self._tail = np.empty(0, np.float64)  # raw values after the last complete level-1 block
        self._mins: list[GrowableArray] = []  # level k+1 at index k
        self._maxs: list[GrowableArray] = []

    @property
    def levels(self) -> int:
        return len(self._mins)

    @property
    def nbytes(self) -> int:
        """Memory of the block minima and maxima (allocated, not only filled)."""
        return sum(g._a.nbytes for g in (*self._mins, *self._maxs)) + self._tail.nbytes

    def clear(self) -> None:
        self.count = 0
        self._tail = np.empty(0, np.float64)
        self._mins.clear()
        self._maxs.clear()

    def _level(self, k: int, hint: int) -> tuple[GrowableArray, GrowableArray]:
        if k == len(self._mins):
            self._mins.append(GrowableArray(max(16, hint), self.dtype, self.growth))
            self._maxs.append(GrowableArray(max(16, hint), self.dtype, self.growth))
        return self._mins[k], self._maxs[k]

    def extend(self, values: np.ndarray) -> None:
        """Append ``values`` (the series' new values, in order)."""
        new = np.asarray(values, np.float64).reshape(-1)
        if not new.size:
            return
        self.count += new.size
        f = self.factor
        raw = np.concatenate((self._tail, new)) if self._tail.size else new
        full = raw.size // f * f
        self._tail = raw[full:].copy()
        if not full:
            return
        blocks = raw[:full].reshape(-1, f)
        mins, maxs = self._level(0, full // f * 2)
        with np.errstate(invalid="ignore"):
            mins.extend(np.fmin.reduce(blocks, axis=1))
            maxs.extend(np.fmax.reduce(blocks, axis=1))
            k = 1
            while self._mins[k - 1].n >= f:
                lower_min, lower_max = self._mins[k - 1], self._maxs[k - 1]
                mins, maxs = self._level(k, lower_min.n // f * 2)
                done, total = mins.n, lower_min.n // f
                if total > done:
                    lo, hi = done * f, total * f
                    mins.extend(np.fmin.reduce(lower_min.data[lo:hi].reshape(-1, f), axis=1))
                    maxs.extend(np.fmax.reduce(lower_max.data[lo:hi].reshape(-1, f), axis=1))
                k += 1

    def _partial(self, level: int) -> tuple[float, float] | None:
        """Min and max of the incomplete block at ``level`` (1-based), None when there is none."""
        if level == 1:
            if not self._tail.size:
                return None
            with np.errstate(invalid="ignore"):
                return float(np.fmin.reduce(self._tail)), float(np.fmax.reduce(self._tail))
        f = self.factor
        done = self._mins[level - 1].n * f if level - 1 < len(self._mins) else 0
        lo = list(self._mins[level - 2].data[done:])
        hi = list(self._maxs[level - 2].data[done:])
        below = self._partial(level - 1)
        if below is not None:
            lo.append(below[0])
            hi.append(below[1])
        if not lo:
            return None
        return float(np.fmin.reduce(lo)), float(np.fmax.reduce(hi))

    def query(
        self, i0: int, i1: int, width: int, raw: Callable[[int, int], np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Positions and values to draw values ``i0:i1`` on ``width`` pixel columns.

        Returns at most ``2 * width + 4`` points: ``raw(i0, i1)`` (the caller's values) when they fit,
        otherwise the minimum and maximum of each of at most ``width`` blocks, about one per pixel column
        and never fewer than ``width / 2`` (both at the block's centre, clipped to the range).
        """
        n = self.count
        i0 = max(0, int(i0))
        i1 = min(n, int(i1))
        width = max(1, int(width))
        if i1 <= i0:
            return np.empty(0, np.float64), np.empty(0, np.float64)
        span = i1 - i0
        if span <= 2 * width or not self._mins:
            return np.arange(i0, i1, dtype=np.float64), np.asarray(raw(i0, i1), np.float64).reshape(-1)
        # The coarsest level with at least one block per pixel column (level 0: the raw values), its
        # blocks then merged to at most ``width``. Taking the first level with at most ``width`` blocks
        # instead drew blocks up to ``factor`` pixels wide: a regular min/max zigzag, not the noise.
        f = self.factor
        level, size = 0, 1
        while level < len(self._mins) and span // (size * f) >= width:
            level += 1
            size *= f
        b0 = i0 // size
        b1 = -(-i1 // size)  # ceil
        if level == 0:
            lo = hi = np.asarray(raw(i0, i1), np.float64).reshape(-1)
        else:
            mins, maxs = self._mins[level - 1], self._maxs[level - 1]
            top = min(b1, mins.n)
            lo = mins.data[b0:top]
            hi = maxs.data[b0:top]
            if b1 > mins.n:
                part = self._partial(level)
                if part is not None:
                    lo = np.append(lo, part[0])
                    hi = np.append(hi, part[1])
        starts = np.arange(b0, b0 + len(lo), dtype=np.float64) * size
        if len(lo) > width:  # merge neighbouring blocks, at most ``factor`` (or the raw values per pixel)
            g = -(-len(lo) // width)
            idx = np.arange(0, len(lo), g)
            with np.errstate(invalid="ignore"):
                lo = np.fmin.reduceat(lo, idx)
                hi = np.fmax.reduceat(hi, idx)
            starts = starts[idx]
            size *= g
        k = len(lo)
        centres = starts + (size - 1) / 2.0
        np.clip(centres, i0, i1 - 1, out=centres)
        x = np.repeat(centres, 2)
        y = np.empty(2 * k, np.float64)
        y[0::2] = lo
        y[1::2] = hi
        return x, y


def _linear_scan(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``y[t] = a[t] * y[t-1] + b[t]`` with ``y[-1] = 0``, by log-step doubling (no Python loop per value)."""
    A = a.astype(np.float64, copy=True)
    B = b.astype(np.float64, copy=True)
    n = len(B)
    k = 1
    while k < n:
        B[k:] = B[k:] + A[k:] * B[:-k]
        A[k:] = A[k:] * A[:-k]
        A[: 2 * k] = 0.0  # these windows reach the start: nothing further back
        k *= 2
        if not A.any() or float(np.max(A)) < 1e-30:
            break
    return B


def _ema_finite(x: np.ndarray, w: float, y_prev: float) -> np.ndarray:
    """``y[t] = w * y[t-1] + (1 - w) * x[t]`` from ``y[-1] = y_prev``, for finite ``x``.

    Vectorised in blocks of ``c`` values (``w**-c`` stays below 1e12): within a block it is a
    scaled cumulative sum; the blocks' carries are one short scan.
    """
    n = len(x)
    c = max(1, min(n, 4096, int(27.6 / -math.log(w))))
    m = -(-n // c)
    xs = np.zeros(m * c, np.float64)
    xs[:n] = x
    xs = xs.reshape(m, c)
    j = np.arange(c, dtype=np.float64)
    inv = np.power(w, -j)
    fwd = np.power(w, j)
    e = np.cumsum(xs * inv, axis=1)
    e *= fwd
    e *= 1.0 - w
    wc = w**c
    b = e[:, -1].copy()
    b[0] += wc * y_prev
    ends = _linear_scan(np.full(m, wc), b)
    starts = np.empty(m, np.float64)
    starts[0] = y_prev
    starts[1:] = ends[:-1]
    e += np.outer(starts, fwd * w)
    return e.reshape(-1)[:n]


def ema_debiased(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style smoothing of ``values`` with ``weight`` in [0, 1) (0: none)."""
    return EmaSmoother(weight).extend(values)


class EmaSmoother:
    """Incremental debiased exponential moving average (TensorBoard's "smoothing").

    ``extend(new)`` returns the smoothed values of ``new``, continuing from the values seen
    before. Non-finite inputs are skipped (their output is NaN and they do not move the average).
    """

    def __init__(self, weight: float):
        if not 0.0 <= weight < 1.0:
            raise ValueError("smoothing weight must be in [0, 1)")
        self.weight = float(weight)
        self._last = 0.0
        self._count = 0

    def reset(self) -> None:
        self._last = 0.0
        self._count = 0

    def extend(self, values: np.ndarray) -> np.ndarray:
        x = np.asarray(values, np.float64)
        n = len(x)
        out = np.full(n, np.nan)
        if n == 0:
            return out
        good = np.isfinite(x)
        all_good = bool(good.all())
        xf = x if all_good else x[good]
        k = len(xf)
        if k == 0:
            return out
        w = self.weight
        if w == 0.0:
            y = xf.astype(np.float64, copy=True)
            sm = y
        else:
            y = _ema_finite(xf, w, self._last)
            counts = np.arange(self._count + 1, self._count + k + 1, dtype=np.float64)
            sm = y / -np.expm1(counts * math.log(w))  # y / (1 - w**count)
        if all_good:
            out = sm
        else:
            out[good] = sm
        self._last = float(y[-1])
        self._count += k
        return out
