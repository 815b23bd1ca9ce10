"""The guard banner's roll-back, as a person uses it: the restored state is from before the trouble.

``regression`` with the rate set to 0.5 mid-run (the README's recipe): the guard pauses, and
"Roll back..." (with "resume after roll-back" ticked, as it is by default) must restore a checkpoint
saved before the rate was raised, never the pause checkpoint written after the bad steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PySide6.QtCore import Qt


def test_banner_rollback_restores_a_checkpoint_from_before_the_raised_rate(qtbot, window, one_thread):
    with qtbot.waitSignal(window.scriptLoaded, timeout=30000):
        window.load_script("regression")
    window.controls.length_kind.setCurrentText("steps")
    window.controls.length.setValue(3000)
    qtbot.mouseClick(window.toolbar.widgetForAction(window.act_start), Qt.MouseButton.LeftButton)
    eng = window.engine
    assert eng is not None and eng.config.divergence == "pause", window.messages
    qtbot.waitUntil(lambda: eng.step >= 230, timeout=30000)  # past the checkpoint of step 200
    field = window.controls.lr.edit
    field.setFocus()
    field.selectAll()
    qtbot.keyClicks(field, "0.5")
    qtbot.keyClick(field, Qt.Key.Key_Return)
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
    window.stop_run()
    qtbot.waitUntil(lambda: window._end_handled, timeout=30000)
