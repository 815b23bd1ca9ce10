"""RunTrace, the Qt layer's view of one run's step buffer: decimated queries and the smoothed loss."""

from __future__ import annotations

import numpy as np
import pytest

from lrviz.decimate import ema_debiased
from lrviz.records import StepBuffer


def test_run_trace_queries_a_step_buffer():
    from lrviz.ui.trace import RunTrace

    buf = StepBuffer(groups=2, capacity=16, first_step=100)
    for i in range(5000):
        buf.append(0, i * 0.001, 1.0 + (i == 2500) * 9.0, 0.5, [0.1, 0.01])
    tr = RunTrace(buf, label="t")
    assert tr.update() and not tr.update()
    assert tr.groups == 2 and tr.first_step == 100 and tr.last_step == 5099
    x, y = tr.query("loss", 100, 5099, 200)
    assert len(x) <= 404 and y.max() == 10.0 and x.min() >= 100
    x, y = tr.query("lr1", 0, 10_000, 200)
    assert np.allclose(y, 0.01)
    v = tr.value_at(2600)
    assert v["loss"] == 10.0 and v["lr"] == [0.1, 0.01]
    assert tr.value_at(99) is None
    tr.set_smoothing(0.0)
    assert tr.value_at(2600)["loss_smooth"] == 10.0


def test_trace_recomputes_the_smoothed_loss_it_does_not_keep():
    """The trace stores no smoothed copy: what it draws and reads back equals smoothing the whole history."""
    from lrviz.ui.trace import SMOOTH_BLOCK, RunTrace

    rng = np.random.default_rng(3)
    n = 3 * SMOOTH_BLOCK + 77
    loss = rng.lognormal(size=n)
    loss[[5, SMOOTH_BLOCK + 2]] = np.nan  # non-finite values are skipped, as the smoother does
    buf = StepBuffer()
    trace = RunTrace(buf, smoothing=0.9)
    for a in range(0, n, 1000):  # folded in several updates, as the redraw timer does
        b = min(n, a + 1000)
        buf.extend({"epoch": np.zeros(b - a, np.int32), "time": np.arange(a, b, dtype=float),
                    "loss": loss[a:b], "grad_norm": np.ones(b - a, np.float32), "lr": np.full((b - a, 1), 0.1)})
        trace.update()
    want = ema_debiased(loss, 0.9)
    for row in (0, 1, SMOOTH_BLOCK - 1, SMOOTH_BLOCK, 2 * SMOOTH_BLOCK + 5, n - 1):
        assert trace.value_at(row)["loss_smooth"] == pytest.approx(want[row], rel=1e-12)
    x, y = trace.query("loss_smooth", SMOOTH_BLOCK - 10, SMOOTH_BLOCK + 10, 400)  # few rows: raw values
    np.testing.assert_allclose(y, want[SMOOTH_BLOCK - 10:SMOOTH_BLOCK + 11], rtol=1e-12)
    trace.set_smoothing(0.5)
    want = ema_debiased(loss, 0.5)
    assert trace.value_at(n - 1)["loss_smooth"] == pytest.approx(want[-1], rel=1e-12)
    x, y = trace.query("loss_smooth", 0, n, 100)  # the whole history: block extremes of the new smoothing
    assert np.nanmax(y) == pytest.approx(np.nanmax(want), rel=1e-6) and np.nanmin(y) == pytest.approx(
        np.nanmin(want), rel=1e-6)
