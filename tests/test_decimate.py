"""The min/max level-of-detail pyramid and the debiased EMA (pure NumPy, no Qt)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lrviz.decimate import EmaSmoother, PeakPyramid, ema_debiased


def pyramid_of(values: np.ndarray, chunks: int = 1) -> PeakPyramid:
    p = PeakPyramid()
    for part in np.array_split(values, chunks):
        p.extend(part)
    return p


@pytest.fixture(scope="module")
def million() -> np.ndarray:
    rng = np.random.default_rng(0)
    y = rng.normal(1.0, 0.01, 1_000_000)
    y[654_321] = 50.0  # a one-step spike
    y[123_457] = -40.0  # and a one-step dip
    return y


def test_a_one_step_spike_survives_every_zoom_level(million):
    p = pyramid_of(million, chunks=37)
    raw = lambda a, b: million[a:b]  # noqa: E731
    n = len(million)
    for width in (50, 300, 1000, 4000):
        spans = [n, n // 3, n // 30, 10_000, 1000, 100]
        for span in spans:
            lo = max(0, 654_321 - span // 2)
            x, y = p.query(lo, lo + span, width, raw)
            assert y.max() == 50.0, (width, span)
            assert len(x) <= 2 * width + 4
        x, y = p.query(0, n, width, raw)
        assert y.min() == -40.0


def test_output_is_bounded_by_the_pixel_width_and_covers_the_range(million):
    p = pyramid_of(million)
    raw = lambda a, b: million[a:b]  # noqa: E731
    for i0, i1, width in ((0, 1_000_000, 800), (10, 999_999, 1), (5000, 905_000, 1920), (333, 700, 200)):
        x, y = p.query(i0, i1, width, raw)
        assert len(x) == len(y) <= 2 * width + 4
        assert x[0] >= i0 and x[-1] <= i1 - 1
        assert np.all(np.diff(x) >= 0)
        # min/max of the drawn points are the true ones over the range (blocks may overhang a little)
        assert y.max() >= million[i0:i1].max() and y.min() <= million[i0:i1].min()


@pytest.mark.parametrize("factor", [4, 8])
def test_blocks_are_about_a_pixel_wide_at_every_span(million, factor):
    """Blocks up to ``factor`` pixels wide drew a regular zigzag over noise (seen in the app at factor 8:
    4,919 steps on 329 pixels came back as 78 blocks of 64 steps)."""
    p = PeakPyramid(factor=factor)
    p.extend(million)
    raw = lambda a, b: million[a:b]  # noqa: E731
    for span in (700, 1500, 4919, 30_000, 333_333, 1_000_000):
        for width in (100, 329, 800):
            if span <= 2 * width:
                continue
            x, y = p.query(0, span, width, raw)
            blocks = len(x) // 2
            assert width / 2 <= blocks <= width, (span, width, blocks)
            assert y.max() >= million[:span].max() and y.min() <= million[:span].min()


def test_small_ranges_are_drawn_raw(million):
    p = pyramid_of(million)
    x, y = p.query(100, 300, 500, lambda a, b: million[a:b])
    assert np.array_equal(x, np.arange(100, 300)) and np.array_equal(y, million[100:300])


def test_incremental_equals_one_go_and_partial_blocks_count():
    rng = np.random.default_rng(1)
    values = rng.normal(size=100_003)
    a = pyramid_of(values, chunks=1)
    b = PeakPyramid()
    for i in range(0, len(values), 997):  # uneven chunks leave partial blocks at every level
        b.extend(values[i:i + 997])
    assert a.count == b.count == len(values) and a.levels == b.levels
    raw = lambda s, e: values[s:e]  # noqa: E731
    for i0, i1 in ((0, len(values)), (50, 99_999), (90_000, 100_003)):
        xa, ya = a.query(i0, i1, 300, raw)
        xb, yb = b.query(i0, i1, 300, raw)
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    # the newest value is in the partial block at the end
    values2 = np.append(values, 1e9)
    b.extend(values2[-1:])
    _, y = b.query(0, len(values2), 300, lambda s, e: values2[s:e])
    assert y.max() == 1e9


def test_non_finite_values_do_not_hide_the_finite_ones():
    values = np.ones(10_000)
    values[5000] = np.nan
    values[7000] = 3.0
    p = pyramid_of(values)
    _, y = p.query(0, len(values), 100, lambda a, b: values[a:b])
    assert np.nanmax(y) == 3.0 and np.isfinite(y).all()


def reference_ema(x: np.ndarray, w: float) -> np.ndarray:
    out, last, count = [], 0.0, 0
    for v in x:
        if not math.isfinite(v):
            out.append(math.nan)
            continue
        last = last * w + (1 - w) * v
        count += 1
        out.append(last / (1 - w**count))
    return np.array(out)


@pytest.mark.parametrize("w", [0.0, 0.3, 0.6, 0.9, 0.99, 0.999])
def test_ema_matches_tensorboard_and_continues_incrementally(w):
    rng = np.random.default_rng(2)
    x = rng.normal(2.0, 1.0, 5000)
    x[100] = np.nan
    x[2000] = np.inf
    ref = reference_ema(x, w)
    whole = ema_debiased(x, w)
    sm = EmaSmoother(w)
    parts = np.concatenate([sm.extend(x[:1]), sm.extend(x[1:777]), sm.extend(x[777:])])
    for got in (whole, parts):
        assert np.array_equal(np.isnan(got), np.isnan(ref))
        assert np.allclose(got, ref, rtol=1e-10, atol=1e-12, equal_nan=True)
    assert whole[0] == x[0]  # debiased: the first value is not pulled towards 0
