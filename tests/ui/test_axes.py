"""The axes' tick choice: at least two labelled ticks inside every axis, log or linear."""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
import pytest
from lrviz.ui.axes import StepAxis, ValueAxis, linear_ticks, log_ticks, step_text


def test_log_ticks_label_at_least_two_values_inside_any_view():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        lo = rng.uniform(-9, 4)
        hi = lo + 10 ** rng.uniform(-5, 1.2)  # from 1e-5 of a decade to 16 decades
        px = rng.uniform(40, 900)
        label_px = rng.uniform(8, 20)
        labels, minor = log_ticks(lo, hi, px, label_px)
        margin = 0.55 * label_px * (hi - lo) / px
        inside = [v for v in labels if lo + margin - 1e-12 <= v <= hi - margin + 1e-12]
        assert len(inside) >= 2, (lo, hi, px, labels)
        texts = [labels[v] for v in sorted(labels)]
        assert len(set(texts)) == len(texts), (lo, hi, px, texts)
        values = [float(t) for t in texts]
        assert values == sorted(values)  # the text says the value where it is drawn
        for v, t in labels.items():
            assert float(t) == pytest.approx(10**v, rel=0.05), (v, t)
        assert all(lo <= v <= hi for v in minor)


@pytest.mark.parametrize("lo, hi, expected", [
    (0.27, 0.33, ["0.28", "0.3", "0.32"]),  # a constant rate of 0.3, padded
    (0.01, 1.0, ["0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1"]),  # the usual 1-2-5 labels
])
def test_log_ticks_examples(lo, hi, expected):
    labels, _ = log_ticks(math.log10(lo), math.log10(hi), 100, 14)
    assert [labels[v] for v in sorted(labels)] == expected


def test_linear_ticks():
    assert linear_ticks(-0.4, 0.4) == ([-0.4, -0.2, 0.0, 0.2, 0.4], 0.2)
    values, step = linear_ticks(0.2999, 0.3001)
    assert len(values) >= 2 and step == pytest.approx(5e-5)
    values, _ = linear_ticks(0.0, 1.0, 2, 3)
    assert 2 <= len(values) <= 3
    assert step_text(950) == "950" and step_text(12_000) == "12k" and step_text(1_500_000) == "1.5M"


@pytest.mark.parametrize("log_y, y_range", [
    (False, (0.29995, 0.30005)), (False, (-1e-9, 1e-9)), (False, (1e6, 1e6 + 3)), (True, (math.log10(0.3) - 0.01,
                                                                                   math.log10(0.3) + 0.01)),
])
@pytest.mark.parametrize("height", [60, 200])
def test_a_short_axis_over_a_narrow_range_draws_two_labels(qtbot, tick_labels, log_y, y_range, height):
    w = pg.PlotWidget(axisItems={"left": ValueAxis("left"), "bottom": StepAxis("bottom")})
    qtbot.addWidget(w)
    w.resize(300, height + 40)
    w.getAxis("left").setWidth(64)  # as in the app (a width that follows the labels settles a frame later)
    w.setLogMode(y=log_y)
    w.plot([0, 1], [1, 1])
    w.show()
    qtbot.waitExposed(w)
    w.setYRange(*y_range, padding=0)
    qtbot.waitUntil(lambda: w.getAxis("left").range == pytest.approx(list(y_range)))
    qtbot.wait(20)
    labels = tick_labels(w.getAxis("left"))
    assert len(labels) >= 2 and len(set(labels)) == len(labels), labels
