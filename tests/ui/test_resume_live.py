"""A resumed run shows its whole history live: the markers and validation points from before the resume."""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt


def test_a_resumed_run_shows_its_earlier_markers_and_validation(qtbot, window, one_thread):
    with qtbot.waitSignal(window.scriptLoaded, timeout=30000):
        window.load_script("regression")
    window.controls.length_kind.setCurrentText("steps")
    window.controls.length.setValue(3000)
    qtbot.mouseClick(window.toolbar.widgetForAction(window.act_start), Qt.MouseButton.LeftButton)
    eng = window.engine
    qtbot.waitUntil(lambda: eng.step >= 100, timeout=30000)
    field = window.controls.lr.edit
    field.setFocus()
    field.selectAll()
    qtbot.keyClicks(field, "0.04")
    qtbot.keyClick(field, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: any(e.kind == "set_lr" for e in eng.events) and eng.step >= 420, timeout=30000)
    window.stop_run()
    qtbot.waitUntil(lambda: window._end_handled, timeout=30000)
    set_at = next(e.step for e in eng.events if e.kind == "set_lr")

    panel = window.lab.fork
    panel.refresh()
    panel.select_run(eng.run_id)
    qtbot.mouseClick(panel.resume_button, Qt.MouseButton.LeftButton)
    resumed = window.engine
    assert resumed is not eng and resumed.origin.kind == "resume", window.messages
    start = resumed.origin.step
    qtbot.waitUntil(lambda: resumed.step >= start + 40, timeout=30000)
    qtbot.waitUntil(lambda: set_at in window.plots.marker_texts(), timeout=5000)
    assert window.plots.marker_texts()[set_at] == "lr 0.04"

    def drawn_validation() -> np.ndarray:
        steps, _ = window.plots.primary.val_loss.getData()
        return np.zeros(0) if steps is None else np.asarray(steps)

    qtbot.waitUntil(lambda: np.any(drawn_validation() >= start), timeout=10000)
    assert np.any(drawn_validation() < start)  # the points from before the resume
    window.stop_run()
    qtbot.waitUntil(lambda: window._end_handled, timeout=30000)
