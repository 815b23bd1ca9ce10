"""The lab's numbers: the range-test plot shows the fall of the loss, the suggestions are confirmed
by training (on a fresh model and on a paused run, restored exactly; see also ``test_lab.py``), and
the diagnostics key of a 12-layer model never covers its plots. The panels sit in ``LabHost`` (the
window's seam) on in-process runs."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pytest
from lab_host import host_fixture  # noqa: F401  (the ``host`` fixture)
from lrviz.ui.lab.range_test import CHOICES, CONFIRM_MODES
from PySide6.QtCore import Qt
from PySide6.QtGui import QTextDocument

SCRIPTS = Path(__file__).parents[1] / "scripts"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def click(qtbot, widget) -> None:
    qtbot.mouseClick(widget, Qt.MouseButton.LeftButton)


def confirm_mode(panel, value) -> None:
    panel.confirm_mode.setCurrentIndex([v for _, v in CONFIRM_MODES].index(value))


def run_test(qtbot, panel) -> None:
    click(qtbot, panel.run_button)
    assert panel.busy()
    qtbot.waitUntil(lambda: not panel.busy(), timeout=60000)


# ---- the range test plot -----------------------------------------------------------------------------
def test_the_range_test_plot_shows_the_fall_of_the_loss_not_the_blow_up(qtbot, host):
    # Before: the y-axis reached the stop threshold (4x the best smoothed loss, 1.8 here), and the
    # fall of the loss from 0.7 to 0.4 took a sixth of the height.
    host.load("regression")
    host.lab.show_panel("Range test")
    panel = host.lab.range_test
    confirm_mode(panel, False)
    run_test(qtbot, panel)
    r = panel.result
    assert r is not None and r.stopped_early and "exceeded 4x" in r.stop_reason
    lo, hi = panel.plot.getPlotItem().viewRange()[1]
    m = int(np.nanargmin(r.smoothed))
    fall = r.smoothed[: m + 1]
    raw = r.losses[: m + 1]
    # all of the curve up to its lowest point is in view (the batch losses but for stray ones) ...
    assert lo <= fall.min() and fall.max() <= hi
    assert lo <= np.quantile(raw, 0.02) and np.quantile(raw, 0.98) <= hi
    # ... it fills the height, and the blow-up after it leaves at the top
    span = max(fall.max(), np.quantile(raw, 0.98)) - min(fall.min(), np.quantile(raw, 0.02))
    assert hi - lo <= 1.2 * span
    assert (fall.max() - fall.min()) / (hi - lo) > 0.3
    assert r.smoothed[-1] > hi or r.losses[-1] > hi


# ---- confirmation --------------------------------------------------------------------------------------
def test_confirm_button_trains_the_candidates_and_chooses_the_winner(qtbot, host):
    host.load("regression")
    panel = host.lab.range_test
    confirm_mode(panel, None)  # the default: only when cheaper than the test; this one stops early
    run_test(qtbot, panel)
    r = panel.result
    assert r.confirmation is None and "not confirmed:" in panel.confirm_label.text()
    assert panel.suggestions.chosen == "valley"
    assert not panel.method.model().item(CHOICES.index("confirmed")).isEnabled()
    click(qtbot, panel.confirm_button)  # on a fresh model again: a run of the panel's own
    assert panel.busy() and "confirming" in panel.confirm_label.text() and panel.own is not None
    qtbot.waitUntil(lambda: not panel.busy(), timeout=60000)
    c = r.confirmation
    assert c is not None and c.winner is not None, panel.errors.text()
    s = panel.suggestions
    assert s.chosen == "confirmed" and s.best == c.winner.lr and panel.method.currentData() == "confirmed"
    assert c.reason in html.unescape(panel.confirm_label.text())
    line = panel.lines["confirmed"]
    assert "✔" in line.label.format and line.value() == pytest.approx(np.log10(c.winner.lr))
    assert "confirmed" in panel.suggestion_label.text()
    # the panel's settings went in: the steps, and the rates of the band
    assert c.steps == 20 and {t.lr for t in c.trials} >= {v for v in s.values().values() if v is not None}
    expected = float(f"{c.winner.lr:.3g}")
    click(qtbot, panel.use_button)
    assert host.controls.lr.value() == pytest.approx(expected)
    # another method can still be chosen by hand
    panel.method.setCurrentIndex(CHOICES.index("valley"))
    assert panel.suggestions.chosen == "valley" and panel.chosen_lr() == s.valley


# ---- diagnostics ----------------------------------------------------------------------------------------
def test_the_diagnostics_key_of_a_12_layer_model_never_covers_its_plots(qtbot, host):
    # Before: the key (12 long names, one run-on label) and the plots were squeezed into the dock
    # and drawn over one another.
    host.load(SCRIPTS / "gpt_names.py")
    lab = host.lab
    lab.show_panel("Diagnostics")
    run = host.start()
    qtbot.waitUntil(run.done.is_set, timeout=60000)
    panel = lab.diagnostics
    qtbot.waitUntil(lambda: len(panel._layer_curves) == 12, timeout=10000)
    qtbot.wait(300)  # layouts settle
    key = panel.layer_key
    widgets = [panel.verdict_text, panel.gap_plot, key, panel.ratio_plot, panel.grad_plot]
    shown = [w for w in widgets if w.isVisible()]
    assert shown == widgets
    rects = [w.geometry() for w in widgets]  # all in the same column
    for (a, wa), (b, wb) in zip(zip(rects, widgets), zip(rects[1:], widgets[1:])):
        assert a.bottom() < b.top(), (wa.objectName(), wb.objectName())
    # every widget has at least the height it needs (the key all of its rows)
    assert key.height() >= key.heightForWidth(key.width())
    doc = QTextDocument()  # and all of its width: no name cut off at the right
    doc.setDefaultFont(key.font())
    doc.setHtml(key.text())
    assert doc.idealWidth() <= key.width()
    assert all(w.height() >= w.minimumHeight() for w in widgets)
    # the key names every layer drawn, without the prefix they all share
    names = list(panel._layer_curves)
    assert all(n.startswith("transformer.") for n in names)
    text = key.text()
    assert all(n.removeprefix("transformer.") in text for n in names)
    assert "transformer." not in text
