"""The app as a new user sees it (issue 7): what is drawn and where, driven through the real window.

Each test looks at what the window shows (tick labels an axis draws, a window's width, legend
entries, the file an export writes), not at internal state.
"""

from __future__ import annotations

import pytest
from lrviz.ui.main_window import MainWindow
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFileDialog


def click(qtbot, widget) -> None:
    qtbot.mouseClick(widget, Qt.MouseButton.LeftButton)


def start_and_finish(qtbot, window: MainWindow, timeout: int = 60000) -> None:
    click(qtbot, window.toolbar.widgetForAction(window.act_start))
    qtbot.waitUntil(lambda: window.engine is not None and window._end_handled, timeout=timeout)


NO_BATCH_SIZE = '''\
"""A script that batches its own data: build_data() takes no batch_size."""
import torch
from torch import nn

DEFAULTS = {"lr": 0.05, "optimizer": "sgd", "epochs": 3, "seed": 0}


def build_model():
    return nn.Linear(2, 1)


def build_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=g)
    y = x.sum(1, keepdim=True)
    return [(x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)]


loss_fn = nn.MSELoss()
'''


# ---- item 16: export names, the status bar's epoch, the batch-size field ----------------------------

@pytest.mark.parametrize("typed, picked, written", [
    ("run1.svg", "PNG image (*.png)", "run1.svg"),
    ("run1.PDF", "PNG image (*.png)", "run1.pdf"),
    ("run1", "SVG image (*.svg)", "run1.svg"),
    ("run1.v2", "PDF document (*.pdf)", "run1.v2.pdf"),
])
def test_export_plot_follows_the_extension_typed(qtbot, window, make_script, open_script, tmp_path,
                                                 monkeypatch, typed, picked, written):
    open_script(make_script("ext.py", steps=30))
    start_and_finish(qtbot, window)
    out = tmp_path / "exports"
    out.mkdir()
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(out / typed), picked)))
    window.act_export_plot.trigger()
    assert [p.name for p in out.iterdir()] == [written], window.messages
    head = (out / written).read_bytes()[:400]
    fmt = written.rsplit(".", 1)[1]
    assert {"png": head.startswith(b"\x89PNG"), "svg": b"<svg" in head, "pdf": head.startswith(b"%PDF")}[fmt]


def test_status_bar_ends_on_the_last_epoch(qtbot, window, make_script, open_script):
    open_script(make_script("epochs.py", source=NO_BATCH_SIZE))
    assert window.controls.length_kind.currentText() == "epochs" and window.controls.length.value() == 3
    start_and_finish(qtbot, window)
    assert window.engine.state == "finished"
    assert window.loss_label.text().endswith("epoch 3 of 3"), window.loss_label.text()


def test_batch_size_field_shows_no_made_up_number(qtbot, window, make_script, open_script):
    open_script(make_script("own_batches.py", source=NO_BATCH_SIZE))
    field = window.controls.batch_size
    assert not field.isEnabled()
    assert field.text() == "set by the script"
    assert "32" not in field.text()
    open_script(make_script("takes_it.py", steps=10))  # build_data(batch_size=16): the field is back
    assert field.isEnabled() and field.value() == 16 and field.text() == "16"
