"""The app as a new user sees it (issue 7): what is drawn and where, driven through the real window.

Each test looks at what the window shows (tick labels an axis draws, a window's width, legend
entries, the file an export writes), not at internal state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyqtgraph as pg
import pytest
from lrviz.ui.main_window import MainWindow
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFileDialog
from window_driving import WAIT_MS, button, click, wait_answer, wait_ended, wait_steps

from lrviz.records import Event
from lrviz.states import RunState

pytestmark = pytest.mark.slow  # the real window, its scripts trained in worker processes


def start_and_finish(qtbot, window: MainWindow) -> None:
    click(qtbot, button(window, window.act_start))
    qtbot.waitUntil(lambda: window.run is not None and window.run.state != RunState.PREPARING, timeout=WAIT_MS)
    wait_ended(qtbot, window)


#: A script that batches its own data (build_data() takes no batch_size): the corpus's healthy script, run
#: for 3 epochs.
NO_BATCH_SIZE = (Path(__file__).parents[1] / "corpus" / "ok.py").read_text() + \
    '\nDEFAULTS = {"lr": 0.05, "optimizer": "sgd", "epochs": 3, "seed": 0}\n'


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
    assert window.run.state == RunState.FINISHED
    label = window.status.loss_label
    assert label.text().endswith("epoch 3 of 3"), label.text()


def test_batch_size_field_shows_no_made_up_number(qtbot, window, make_script, open_script):
    open_script(make_script("own_batches.py", source=NO_BATCH_SIZE))
    field = window.controls.batch_size
    assert not field.isEnabled()
    assert field.text() == "set by the script"
    assert "32" not in field.text()
    open_script(make_script("takes_it.py", steps=10))  # build_data(batch_size=16): the field is back
    assert field.isEnabled() and field.value() == 16 and field.text() == "16"


# ---- item 14: every axis shows at least two labelled ticks ----------------------------------------

def _shown_axes(window: MainWindow):
    plots = window.plots
    return {name: plots.plots[name].getAxis("left") for name in plots._shown}


def test_constant_rate_of_0_3_gets_labelled_ticks(qtbot, window, make_script, open_script, tick_labels):
    open_script(make_script("flat.py", steps=40))
    window.controls.lr.set_value(0.3)
    start_and_finish(qtbot, window)
    window.plots.refresh(force=True)
    qtbot.wait(50)
    lr_axis = window.plots.plots["lr"].getAxis("left")
    assert lr_axis.logMode
    labels = tick_labels(lr_axis)
    assert len(labels) >= 2, labels
    assert any(float(t) == pytest.approx(0.3) for t in labels) or \
        min(map(float, labels)) < 0.3 < max(map(float, labels)), labels


@pytest.mark.parametrize("log_loss", [True, False])
def test_every_axis_has_two_labels_for_a_loss_within_a_decade(qtbot, window, stored_run, log_loss, tick_labels):
    n = 400
    loss = np.linspace(3.3, 2.0, n) + 0.01 * np.sin(np.arange(n))  # 2 .. 3.3: less than a decade
    run_id = stored_run(loss, lr=0.3, grad_norm=0.7)
    window.log_checks["loss"].setChecked(log_loss)
    window.log_checks["grad"].setChecked(True)
    window.open_run(run_id)
    window.plots.refresh(force=True)
    qtbot.wait(50)
    axes = _shown_axes(window)
    assert set(axes) == {"loss", "lr", "grad"}
    for name, axis in axes.items():
        labels = tick_labels(axis)
        assert len(labels) >= 2, (name, labels)
        assert len(set(labels)) == len(labels), (name, labels)
    bottom = tick_labels(window.plots.plots["grad"].getAxis("bottom"))
    assert len(bottom) >= 2, bottom


def test_schedule_preview_of_a_constant_rate_sits_on_a_rate_axis(qtbot, window, make_script, open_script,
                                                                 tick_labels):
    open_script(make_script("preview.py", steps=300))
    editor = window.controls.schedule
    window.controls.lr.set_value(0.05)
    window.controls.lr.set_button.click()
    editor.set_spec(None)
    qtbot.wait(20)
    lo, hi = editor.preview.getViewBox().viewRange()[1]
    assert lo >= 0 and 0.05 < hi < 0.1, (lo, hi)
    labels = tick_labels(editor.preview.getAxis("left"))
    assert len(labels) >= 2 and all(float(t) >= 0 for t in labels), labels


# ---- item 13: opening another script starts from a clean slate ---------------------------------------

def test_opening_another_script_clears_the_last_runs_overlays_and_legend(qtbot, window, make_script, open_script):
    open_script(make_script("first.py", steps=80))
    start_and_finish(qtbot, window)
    first = window.run.run_id
    window.controls.optimizer.setCurrentText("adam")
    start_and_finish(qtbot, window)
    second = window.run.run_id
    window.overlay_runs([first, second])
    legend = window.plots.legend_texts()
    assert any(f"#{first}" in t for t in legend) and any(f"#{second}" in t for t in legend)

    open_script(make_script("second.py", steps=30))
    assert window.run is None
    plots = window.plots
    assert plots.primary is None and plots.overlays == []
    assert window.plots.legend_texts() == []
    assert not any(item.isVisible() and len(item.getData()[0] or ()) for p in plots.plots.values()
                   for item in p.listDataItems())  # nothing of the old runs is drawn
    assert "Press Start" in plots._hint.toPlainText() and plots._hint.isVisible()
    assert "#" not in window.view_label.text()
    # The new script's run is shown alone.
    start_and_finish(qtbot, window)
    assert plots.primary is not None and plots.primary.trace.run_id == window.run.run_id
    assert plots.overlays == []


def test_opening_another_script_forgets_the_diagnostics_previous_line(qtbot, window, make_script, open_script):
    open_script(make_script("first.py", steps=80))
    window.lab.options.layer_stats.setValue(10)  # per-layer statistics: the Diagnostics "previous" line
    start_and_finish(qtbot, window)
    window.controls.optimizer.setCurrentText("adam")
    start_and_finish(qtbot, window)
    window.lab.show_panel("Diagnostics")
    diag = window.lab.diagnostics
    qtbot.waitUntil(lambda: "previous" in diag.layer_key.text(), timeout=WAIT_MS)  # SGD's line beside Adam's
    open_script(make_script("second.py", steps=30))
    qtbot.waitUntil(lambda: "previous" not in diag.layer_key.text(), timeout=WAIT_MS)
    assert diag.ratio_plot.getPlotItem().listDataItems() == []


def test_surface_panel_shows_a_surface_script_as_soon_as_it_is_opened(qtbot, window, make_script, open_script):
    from lrviz.examples import example_paths

    open_script(make_script("flat.py", steps=20))
    start_and_finish(qtbot, window)  # the last run is of a script without a surface
    surface = window.lab.surface
    window.lab.show_panel("Surface")
    qtbot.waitUntil(lambda: "has none" in surface.title.text(), timeout=5000)
    rosenbrock = next(p for p in example_paths() if p.stem == "surface_rosenbrock")
    open_script(rosenbrock)
    qtbot.waitUntil(lambda: "has none" not in surface.title.text(), timeout=5000)
    assert "Rosenbrock" in surface.title.text() or "rosenbrock" in surface.title.text().lower()
    assert surface.plot.isVisible()
    assert len(surface.path_points()[0]) == 0  # no path before Start


# ---- item 15: the layout never jumps, and labels never collide ---------------------------------------

def _scene_rect(item):
    return item.mapRectToScene(item.boundingRect())


def _assert_labels_apart_and_inside(plots) -> list:
    """The ribbon's labels: pairwise apart, each wholly inside the ribbon (not cut off at an edge)."""
    labels = [i for i in plots.ribbon.items if isinstance(i, pg.TextItem) and i.isVisible()]
    box = plots.ribbon.getViewBox().sceneBoundingRect()
    rects = [_scene_rect(lab) for lab in labels]
    for lab, r in zip(labels, rects):
        assert box.left() - 0.5 <= r.left() and r.right() <= box.right() + 0.5, (lab.toPlainText(), r, box)
    for i in range(len(rects)):
        for j in range(i + 1, len(rects)):
            assert not rects[i].intersects(rects[j]), (labels[i].toPlainText(), labels[j].toPlainText())
    return labels


def _assert_axis_titles_apart(plots) -> None:
    """Each shown plot's y-axis title lies within its own axis, so titles of stacked plots never overlap."""
    for name in plots._shown:
        axis = plots.plots[name].getAxis("left")
        if axis.label is None or not axis.label.isVisible():
            continue
        title = _scene_rect(axis.label)
        own = axis.sceneBoundingRect()
        assert own.top() - 1 <= title.top() and title.bottom() <= own.bottom() + 1, (name, title, own)


def _diverge(qtbot, window: MainWindow):
    """Run `regression` and raise the rate far too high mid-run: the guard pauses and the banner shows."""
    with qtbot.waitSignal(window.scriptLoaded, timeout=WAIT_MS):
        window.load_script("regression")
    window.controls.length_kind.setCurrentText("steps")
    window.controls.length.setValue(3000)
    click(qtbot, button(window, window.act_start))
    wait_steps(qtbot, window, 120)
    run = window.run
    window.lab.use_lr(5.0)
    qtbot.waitUntil(lambda: run.state == RunState.PAUSED and run.detection is not None, timeout=WAIT_MS)
    qtbot.waitUntil(window.lab.banner.isVisible, timeout=WAIT_MS)
    qtbot.wait(100)
    return run


def test_divergence_banner_keeps_the_window_size_and_nothing_collides(qtbot, tmp_path, shown, pool):
    w = MainWindow(store_path=str(tmp_path / "store"), pool=pool)
    qtbot.addWidget(w)
    w.resize(1280, 800)
    w.show()
    qtbot.waitExposed(w)
    w.lab.show_panel("Diagnostics")
    # The panels as wide as they go (as in the README's screenshots): the plots at their narrowest.
    w.resizeDocks([w.controls_dock, w.lab.docks["Diagnostics"]], [285, 500], Qt.Orientation.Horizontal)
    qtbot.wait(50)
    before = (w.width(), w.centralWidget().width(), w.controls_dock.width(), w.lab.docks["Diagnostics"].width())
    assert before[0] == 1280
    eng = _diverge(qtbot, w)
    after = (w.width(), w.centralWidget().width(), w.controls_dock.width(), w.lab.docks["Diagnostics"].width())
    assert after == before
    plots = w.plots
    plots.refresh(force=True)
    qtbot.wait(50)
    labels = _assert_labels_apart_and_inside(plots)
    shown_text = " ".join(lab.toPlainText() for lab in labels) + " ".join(lab.toolTip() for lab in labels)
    for text in plots.marker_texts().values():
        assert text.split(" · ")[0] in shown_text, (text, shown_text)  # merged labels keep every event
    _assert_axis_titles_apart(plots)
    assert not plots.legend.geometry().intersects(plots.view.geometry())  # the legend covers no plot
    # Stopping does not move anything either (and the window closes, saving its size, as wide as it opened).
    w.runs.stop()
    wait_ended(qtbot, w)
    qtbot.wait(50)
    assert (w.width(), w.centralWidget().width()) == before[:2]
    assert eng.state == RunState.STOPPED
    w.close()


EVENTS_CLOSE = [(0, "set_schedule", {"spec": "CosineAnnealingLR:T_max=500"}), (300, "set_lr", {"lr": 2.0}),
                (302, "diverged", {"message": "loss exploded"}), (303, "pause", {}),
                (305, "set_schedule", {"spec": "StepLR:step_size=100"}), (310, "set_lr", {"lr": 0.2}),
                (499, "stop", {})]


@pytest.mark.parametrize("x_range", [None, (296, 312), (0, 320)])
def test_event_labels_a_few_steps_apart_never_collide_nor_leave_the_plot(qtbot, window, stored_run, x_range):
    events = [Event(s, k, d, float(s)) for s, k, d in EVENTS_CLOSE]
    run_id = stored_run(np.linspace(1.0, 0.2, 500), lr=0.05, events=events)
    window.open_run(run_id)
    plots = window.plots
    if x_range is not None:
        plots.plots["loss"].setXRange(*x_range, padding=0)
    plots.refresh(force=True)
    qtbot.wait(50)
    labels = _assert_labels_apart_and_inside(plots)
    x0, x1 = plots.ribbon.getViewBox().viewRange()[0]
    in_view = [text for step, text in plots.marker_texts().items() if x0 <= step <= x1]
    said = " ".join(lab.toPlainText() + " " + lab.toolTip() for lab in labels)
    for text in in_view:
        assert text in said, (text, said)  # every marker in view is labelled, or in a merged label's tooltip
    if x_range == (296, 312):  # zoomed in: markers 2-3 steps apart are far enough apart for labels of their own
        assert len(labels) >= 4, [lab.toPlainText() for lab in labels]


def test_right_dock_keeps_its_width_when_runs_are_listed_and_selected(qtbot, window, make_script, open_script):
    dock = window.runs_dock
    dock.raise_()
    open_script(make_script("w.py", steps=20))
    qtbot.wait(50)
    width = dock.width()
    for _ in range(3):
        start_and_finish(qtbot, window)
    browser = window.run_browser
    browser.refresh()
    browser.select_runs([r.id for r in window.store.list_runs()])  # "3 runs · 3 selected"
    qtbot.wait(50)
    assert "selected" in browser.count_label.text()
    assert dock.width() == width
    label = browser.count_label  # the count fits in the room left, or ends in "…" (never cut mid-letter)
    shown = label.shown_text()
    assert shown == label.text() or shown.endswith("…")
    assert label.fontMetrics().horizontalAdvance(shown) <= label.contentsRect().width()


def test_a_1280_px_window_fits_every_dock_at_its_narrowest(qtbot, window):
    """The docks' and the plots' smallest widths add up to less than a 1280-px window: nothing makes it
    wider than it opened (the run browser's row of buttons did, at 80 px a button, once Watch joined it)."""
    window.resize(1280, 800)
    window.lab.show_panel("Diagnostics")
    qtbot.wait(50)
    assert window.minimumSizeHint().width() <= 1280
    assert window.width() == 1280
    browser = window.run_browser  # every button still shows its whole text
    for b in (browser.open_button, browser.watch_button, browser.overlay_button, browser.rename_button,
              browser.delete_button):
        assert b.width() >= b.fontMetrics().horizontalAdvance(b.text().replace("&", "")), b.text()


# ---- item 8: the exported plot is what the screen shows ------------------------------------------------

def test_exported_plot_is_what_the_screen_shows(qtbot, window, make_script, open_script, tmp_path):
    import xml.etree.ElementTree as ET

    from lrviz.ui import render

    open_script(make_script("seen.py", steps=300, delay=0.002))
    click(qtbot, button(window, window.act_start))
    wait_steps(qtbot, window, 60)
    window.controls.lr.set_value(0.02)
    window.controls.lr.set_button.click()
    wait_answer(qtbot, window, "lr 0.02 from step")
    wait_steps(qtbot, window, 120)
    window.runs.pause()
    qtbot.waitUntil(lambda: window.run.state == RunState.PAUSED, timeout=WAIT_MS)
    window.controls.schedule.set_spec("StepLR:step_size=50,gamma=0.5")
    window.controls.schedule.apply_button.click()
    wait_answer(qtbot, window, "schedule StepLR")
    window.runs.resume()
    wait_ended(qtbot, window)
    # What the user set on screen: more smoothing, a log loss axis, a zoom on steps 40..250.
    window.smoothing.setValue(85)
    window.plot_bar.apply_smoothing()
    window.log_checks["loss"].setChecked(True)
    vb = window.plots.plots["loss"].getViewBox()
    vb.setXRange(40, 250, padding=0)
    vb.sigRangeChangedManually.emit([True, False])  # as a wheel zoom or a drag does
    window.plots.refresh(force=True)
    plots = window.plots
    on_screen = plots.marker_texts()
    assert sum(len(t.split(" · ")) for t in on_screen.values()) >= 3  # lr 0.02, paused, StepLR

    # The file: the screen's smoothing, panels and markers.
    svg = tmp_path / "seen.svg"
    assert window.exports.export_plot(str(svg), "svg"), window.messages
    text = " ".join(ET.parse(svg).getroot().itertext())
    assert "smoothed (0.85)" in text and "EMA" not in text
    assert "grad" in text and "learning rate" in text  # every panel shown
    for label in on_screen.values():
        for part in label.split(" · "):
            assert part in text or "events" in text, (part, text)

    # The description the file is drawn from is the screen's, item by item.
    runs, spec = window.exports.plot_description()
    assert spec.panels == tuple(plots._shown) and spec.smoothing == pytest.approx(0.85)
    assert spec.log_loss is True and spec.log_lr is True and spec.log_grad is False
    assert spec.x_range == pytest.approx((40, 250))
    fig = render._Figure(runs, spec, (1200, 800))
    try:
        fig.settle()
        assert [name for _, name in fig.legend] == plots.legend_texts()
        assert {m.step: m.text for _, m in fig.markers} == on_screen
        assert fig.plots["loss"].getAxis("left").logMode
        assert fig.plots["loss"].getViewBox().viewRange()[0] == pytest.approx([40, 250])
        smooth = next(item for item, name in fig.legend if name == "smoothed (0.85)")
        xs, ys = smooth.xData, smooth.yData
        assert len(xs) > 100
        live = np.array([plots.primary.trace.value_at(int(x))["loss_smooth"] for x in xs])
        np.testing.assert_allclose(ys, live, rtol=1e-12)  # the very same smoothed values
    finally:
        fig.close()


def test_a_layout_saved_by_an_older_window_never_makes_it_taller_than_the_screen(qtbot, tmp_path, shown, pool):
    """A size and dock layout an older lrviz saved (tests/data/window-state-2026-11.bin, from a real
    settings file) used to open the window 1196x1315 on an 800-px screen: status bar and two plots out of
    sight. The old layout is not laid over the new docks, and the window fits the screen."""
    from pathlib import Path

    from lrviz.ui.app_settings import settings
    from PySide6.QtCore import QByteArray
    from PySide6.QtGui import QGuiApplication

    fresh = MainWindow(store_path=str(tmp_path / "store2"), pool=pool)  # no saved layout: the default one
    qtbot.addWidget(fresh)
    least = fresh.minimumSizeHint()
    fresh.shutdown(10)
    blob = (Path(__file__).parents[1] / "data" / "window-state-2026-11.bin").read_bytes()
    n = int.from_bytes(blob[:4], "big")
    q = settings()
    q.setValue("geometry", QByteArray(blob[4:4 + n]))
    q.setValue("windowState", QByteArray(blob[4 + n:]))
    q.sync()
    w = MainWindow(store_path=str(tmp_path / "store"), pool=pool)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    qtbot.wait(50)
    avail = QGuiApplication.primaryScreen().availableGeometry()
    try:
        assert least.height() <= 800, least  # the default layout fits an 800-px screen
        assert w.height() <= max(avail.height(), least.height()), (w.size(), avail, least)
        assert w.width() <= max(avail.width(), least.width()), (w.size(), avail, least)
        assert w.minimumSizeHint().height() <= max(avail.height(), least.height())
        assert w.statusBar().isVisible()
    finally:
        w.shutdown(10)
