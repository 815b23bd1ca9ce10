"""Roll-back and resume in the real window, as a person uses them.

- ``regression`` with the rate set to 0.5 mid-run (the README's recipe): the guard pauses, and
  "Roll back..." (with "resume after roll-back" ticked, as it is by default) must restore a
  checkpoint saved before the rate was raised, never the pause checkpoint written after the bad steps.
- A resumed run shows its whole history live: the markers and validation points from before the resume.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PySide6.QtCore import Qt


def start_regression(qtbot, window):
    """Load ``regression``, set 3000 steps, press Start; the running engine."""
    with qtbot.waitSignal(window.scriptLoaded, timeout=30000):
        window.load_script("regression")
    window.controls.length_kind.setCurrentText("steps")
    window.controls.length.setValue(3000)
    qtbot.mouseClick(window.toolbar.widgetForAction(window.act_start), Qt.MouseButton.LeftButton)
    assert window.engine is not None, window.messages
    return window.engine


def type_lr(qtbot, window, text: str) -> None:
    """Type a learning rate into the controls and press Enter (it applies to the running run)."""
    field = window.controls.lr.edit
    field.setFocus()
    field.selectAll()
    qtbot.keyClicks(field, text)
    qtbot.keyClick(field, Qt.Key.Key_Return)


def stop(qtbot, window) -> None:
    window.stop_run()
    qtbot.waitUntil(lambda: window._end_handled, timeout=30000)


def test_banner_rollback_restores_a_checkpoint_from_before_the_raised_rate(qtbot, window, one_thread):
    eng = start_regression(qtbot, window)
    assert eng.config.divergence == "pause"
    qtbot.waitUntil(lambda: eng.step >= 230, timeout=30000)  # past the checkpoint of step 200
    type_lr(qtbot, window, "0.5")
    qtbot.waitUntil(lambda: eng.state == "paused" and eng.detection is not None, timeout=30000)
    det = eng.detection
    banner = window.lab.banner
    qtbot.waitUntil(banner.isVisible, timeout=5000)
    assert banner.resume_after.isChecked()  # the default: roll back and go on
    raised = next(i for i, e in enumerate(eng.events) if e.kind == "set_lr")
    raised_at = eng.events[raised].step
    loss_before = float(np.mean(eng.buffer.view()["loss"][raised_at - 20:raised_at]))
    assert any(c.reason == "pause" and c.step > det.step for c in eng.checkpoints)  # the damaged one exists

    qtbot.mouseClick(banner.rollback_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: any(e.kind == "rollback" for e in eng.events), timeout=20000)
    rb = next(e for e in eng.events if e.kind == "rollback")
    ckpt = next(i for i, e in enumerate(eng.events) if e.kind == "checkpoint" and e.data["path"] == rb.data["path"])
    window_start = det.step - eng.guard.config.oscillation_window
    assert rb.data["to_step"] <= min(raised_at, window_start), (rb.data, det.step, raised_at)
    assert ckpt < raised, "restored a checkpoint saved after the rate was raised"
    saved = torch.load(rb.data["path"], weights_only=True)
    assert rb.data["lr"] == pytest.approx(saved["lrs"][0] / 10)
    qtbot.waitUntil(lambda: eng.step >= rb.step + 30, timeout=30000)
    after = eng.buffer.view()["loss"][rb.step:rb.step + 30]
    assert np.all(np.isfinite(after)) and float(np.mean(after)) < 3 * loss_before, (loss_before, after)
    qtbot.waitUntil(lambda: banner.mode == "rolled_back", timeout=5000)
    stop(qtbot, window)


def test_a_resumed_run_shows_its_earlier_markers_and_validation(qtbot, window, one_thread):
    eng = start_regression(qtbot, window)
    qtbot.waitUntil(lambda: eng.step >= 100, timeout=30000)
    type_lr(qtbot, window, "0.04")
    qtbot.waitUntil(lambda: any(e.kind == "set_lr" for e in eng.events) and eng.step >= 420, timeout=30000)
    stop(qtbot, window)
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
    stop(qtbot, window)
