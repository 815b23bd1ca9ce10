"""The learning-rate lab panels, driven in the real main window as a person would.

Range test (band, chosen suggestion, "Use this LR"), sweep (table, diverged runs), the divergence
banner (roll back exactly, LR / 10), fork from a checkpoint (overlaid with its parent), the 2-D
surface view (live path, kept paths, slow motion), diagnostics (verdict, per-layer ratios), and the
teaching notes and drop-down knobs.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from lrviz.ui.main_window import MainWindow
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox

from lrviz.rangetest import METHODS


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models train faster on one thread (and the suite shares 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def click(qtbot, widget) -> None:
    qtbot.mouseClick(widget, Qt.MouseButton.LeftButton)


def type_into(qtbot, field, text: str, enter: bool = False) -> None:
    field.setFocus()
    field.selectAll()
    qtbot.keyClick(field, Qt.Key.Key_Backspace)
    qtbot.keyClicks(field, text)
    if enter:
        qtbot.keyClick(field, Qt.Key.Key_Return)


def load(qtbot, window: MainWindow, name: str) -> None:
    with qtbot.waitSignal(window.scriptLoaded, timeout=30000) as blocker:
        window.load_script(name)
    assert blocker.args[0], window.messages
    assert window.experiment is not None and window.experiment.name == name


def set_steps(window: MainWindow, steps: int) -> None:
    window.controls.length_kind.setCurrentText("steps")
    window.controls.length.setValue(steps)


def start(qtbot, window: MainWindow) -> object:
    click(qtbot, window.toolbar.widgetForAction(window.act_start))
    assert window.engine is not None, window.messages
    return window.engine


def wait_ended(qtbot, window: MainWindow, timeout: int = 30000) -> None:
    qtbot.waitUntil(lambda: window.engine is not None and window._end_handled, timeout=timeout)


# ---- the range test ----------------------------------------------------------------------------------
def test_range_test_draws_the_band_and_use_this_lr_sets_the_rate(qtbot, window):
    load(qtbot, window, "regression")
    lab = window.lab
    lab.show_panel("Range test")
    panel = lab.range_test
    assert "fresh model" in panel.mode_label.text()
    click(qtbot, panel.run_button)
    assert panel.busy()
    qtbot.waitUntil(lambda: not panel.busy(), timeout=30000)
    result, s = panel.result, panel.suggestions
    assert result is not None and s is not None and s.best is not None, panel.errors.text()
    # the three suggestions as a shaded band with a labelled line each, the chosen one highlighted
    lo, hi = s.band()
    assert panel.band is not None
    assert panel.band.getRegion() == pytest.approx((math.log10(lo), math.log10(hi)))
    drawn = [m for m in METHODS if s.values()[m] is not None]
    assert set(panel.lines) == set(drawn) and len(drawn) >= 2
    chosen = panel.lines[s.chosen]
    assert "✔" in chosen.label.format
    assert all(chosen.pen.widthF() > panel.lines[m].pen.widthF() for m in drawn if m != s.chosen)
    assert "Suggested learning rate" in panel.suggestion_label.text()
    assert panel.stop_label.text().startswith(("Stopped:", "Ran all"))
    assert len(panel.raw_curve.getData()[0]) == len(result.lrs) or not np.isfinite(result.losses).all()
    # another method highlights another line, without running again
    other = next(m for m in drawn if m != s.chosen)
    panel.method.setCurrentIndex(METHODS.index(other))
    assert panel.suggestions.chosen == other and "✔" in panel.lines[other].label.format
    # one click sets the learning rate control (nothing is running: it applies at the start)
    expected = float(f"{panel.chosen_lr():.3g}")
    click(qtbot, panel.use_button)
    assert window.controls.lr.value() == pytest.approx(expected)


def test_range_test_says_why_there_is_no_suggestion(qtbot, window):
    load(qtbot, window, "regression")
    panel = window.lab.range_test
    type_into(qtbot, panel.start, "1e-9")
    type_into(qtbot, panel.end, "1e-8")  # far too low for the loss to fall
    type_into(qtbot, panel.steps, "30")
    click(qtbot, panel.run_button)
    qtbot.waitUntil(lambda: not panel.busy(), timeout=30000)
    assert panel.result is not None and panel.suggestions.best is None
    assert "no suggestion:" in panel.suggestion_label.text() and panel.suggestions.reason
    assert panel.band is None and not panel.lines
    assert not panel.use_button.isEnabled()
    assert panel.stop_label.text() == "Ran all 30 steps up to 1e-8."


def test_range_test_on_a_paused_run_restores_the_weights_and_sets_the_rate_live(qtbot, window):
    load(qtbot, window, "regression")
    set_steps(window, 3000)
    eng = start(qtbot, window)
    qtbot.waitUntil(lambda: eng.step >= 50, timeout=20000)
    click(qtbot, window.toolbar.widgetForAction(window.act_pause))
    qtbot.waitUntil(lambda: eng.state == "paused", timeout=10000)
    before = {k: v.clone() for k, v in eng.model.state_dict().items()}
    step = eng.step
    panel = window.lab.range_test
    panel.update_mode()
    assert "live run" in panel.mode_label.text()
    type_into(qtbot, panel.steps, "60")
    click(qtbot, panel.run_button)
    qtbot.waitUntil(lambda: not panel.busy(), timeout=30000)
    assert panel.result is not None and len(panel.result.lrs) > 10
    assert eng.step == step and eng.state == "paused"
    for k, v in eng.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(e.kind == "range_test" for e in eng.events)
    if panel.chosen_lr() is not None:
        expected = float(f"{panel.chosen_lr():.3g}")
        click(qtbot, panel.use_button)
        qtbot.waitUntil(lambda: any(e.kind == "set_lr" for e in eng.events), timeout=5000)
        assert eng.lrs[0] == pytest.approx(expected) and eng.state == "paused"
    window.stop_run()
    wait_ended(qtbot, window)


# ---- the sweep ---------------------------------------------------------------------------------------
def test_sweep_fills_the_table_and_marks_the_too_high_rate_diverged(qtbot, window):
    load(qtbot, window, "regression")
    lab = window.lab
    lab.show_panel("Sweep")
    panel = lab.sweep
    type_into(qtbot, panel.lrs, "0.01,0.1,3")
    panel.steps.setValue(150)
    click(qtbot, panel.run_button)
    assert panel.busy()
    qtbot.waitUntil(lambda: not panel.busy(), timeout=60000)
    rows = panel.table_rows()
    assert len(rows) == 3, panel.errors.text()
    assert [r[0].lstrip("■ ") for r in rows] == ["0.01", "0.1", "3"]
    assert rows[0][1] == rows[1][1] == "finished" and rows[0][7] == rows[1][7] == "no"
    assert rows[2][1] == "diverged" and rows[2][7] == "yes"
    assert panel.table.item(2, 7).foreground().color().name().lower() == "#d55e00"
    assert rows[1][6] not in ("", "—"), "the good rates reach the target"
    assert "Diverged: lr 3" in panel.progress_label.text()
    # every run drawn, each in its own colour, and saved in the app's store
    pens = {r.curve.opts["pen"].color().name() for r in panel.runs}
    assert len(pens) == 3
    assert len(window.store.list_runs()) == 3
    # selecting a row highlights its curve
    panel.table.selectRow(1)
    assert panel.runs[1].curve.opts["pen"].widthF() > panel.runs[0].curve.opts["pen"].widthF()
    assert panel.runs[0].curve.opts["pen"].color().alpha() < 255


# ---- the divergence guard -------------------------------------------------------------------------------
def test_divergence_pauses_with_the_explanation_and_rolls_back_exactly(qtbot, window):
    load(qtbot, window, "regression")
    set_steps(window, 3000)
    assert window.lab.options.checkpoint_every.value() == 200
    eng = start(qtbot, window)
    assert eng.config.divergence == "pause" and eng.config.checkpoint_every == 200
    qtbot.waitUntil(lambda: eng.step >= 230, timeout=20000)
    type_into(qtbot, window.controls.lr.edit, "2", enter=True)  # far too high mid-run
    qtbot.waitUntil(lambda: eng.state == "paused" and eng.detection is not None, timeout=20000)
    banner = window.lab.banner
    qtbot.waitUntil(banner.isVisible, timeout=5000)
    det = eng.detection
    assert f"step {det.step:,}" in banner.title.text()
    assert det.explanation[:60] in banner.explanation.text().replace("&#x27;", "'")
    assert banner.rollback_button.isEnabled() and banner.resume_button.isVisible()
    qtbot.waitUntil(lambda: "diverged" in window.plots.marker_texts().get(det.step, ""), timeout=5000)
    # roll back, staying paused to look at the restored run
    banner.resume_after.setChecked(False)
    n = len(eng.events)
    click(qtbot, banner.rollback_button)
    qtbot.waitUntil(lambda: any(e.kind == "rollback" for e in eng.events[n:]), timeout=10000)
    rb = [e for e in eng.events if e.kind == "rollback"][-1]
    assert eng.state == "paused"
    saved = torch.load(rb.data["path"], weights_only=True)
    assert rb.data["to_step"] == saved["step"] <= det.step
    for name, t in eng.model.state_dict().items():
        assert torch.equal(t, saved["model"][name]), name
    assert eng.lrs[0] == pytest.approx(saved["lrs"][0] / 10)
    qtbot.waitUntil(lambda: banner.mode == "rolled_back", timeout=5000)
    assert "Rolled back" in banner.title.text() and window.controls.lr.value() == pytest.approx(eng.lrs[0])
    click(qtbot, banner.resume_button)
    qtbot.waitUntil(lambda: eng.step > rb.step + 20, timeout=20000)
    window.stop_run()
    wait_ended(qtbot, window)
    assert np.isfinite(eng.buffer.view()["loss"][-1])


def test_automatic_rollback_shows_its_events(qtbot, window):
    load(qtbot, window, "regression")
    set_steps(window, 3000)
    window.lab.options.auto_rollback.setChecked(True)
    eng = start(qtbot, window)
    assert eng.config.divergence == "rollback"
    qtbot.waitUntil(lambda: eng.step >= 230, timeout=20000)
    type_into(qtbot, window.controls.lr.edit, "2", enter=True)
    qtbot.waitUntil(lambda: any(e.kind == "rollback" for e in eng.events), timeout=20000)
    banner = window.lab.banner
    qtbot.waitUntil(lambda: banner.mode == "auto", timeout=5000)
    assert "Automatic roll-back" in banner.title.text()
    rb = next(e for e in eng.events if e.kind == "rollback")
    qtbot.waitUntil(lambda: rb.step in window.plots.marker_texts(), timeout=5000)
    assert "rollback" in window.plots.marker_texts()[rb.step]
    window.stop_run()
    wait_ended(qtbot, window)


# ---- fork and resume -------------------------------------------------------------------------------------
def test_fork_from_a_checkpoint_is_overlaid_with_its_parent(qtbot, window):
    load(qtbot, window, "regression")
    set_steps(window, 500)
    parent = start(qtbot, window)
    wait_ended(qtbot, window)
    assert parent.state == "finished"
    lab = window.lab
    lab.show_panel("Fork / resume")
    panel = lab.fork
    panel.refresh()
    panel.select_run(parent.run_id)
    assert panel.select_checkpoint(200)
    type_into(qtbot, panel.lr, "0.005")
    click(qtbot, panel.fork_button)
    child = window.engine
    assert child is not parent and child.origin is not None and child.origin.step == 200
    wait_ended(qtbot, window)
    assert child.state == "finished", window.messages
    info = window.store.get_run(child.run_id)
    assert info.parent_id == parent.run_id and info.fork_step == 200
    steps = window.store.load_steps(child.run_id)
    assert int(steps["step"][0]) == 200 and float(steps["lr"][0][0]) == pytest.approx(0.005)
    assert [o.trace.run_id for o in window.plots.overlays] == [parent.run_id]
    assert window.plots.primary is not None and window.plots.primary.trace.first_step == 200


def test_resume_a_stopped_run_from_its_last_checkpoint(qtbot, window):
    load(qtbot, window, "regression")
    set_steps(window, 3000)
    eng = start(qtbot, window)
    qtbot.waitUntil(lambda: eng.step >= 420, timeout=20000)
    window.stop_run()
    wait_ended(qtbot, window)
    assert eng.state == "stopped"
    panel = window.lab.fork
    panel.refresh()
    panel.select_run(eng.run_id)
    assert panel.resume_button.isEnabled()
    click(qtbot, panel.resume_button)
    resumed = window.engine
    assert resumed is not eng and resumed.origin.kind == "resume"
    qtbot.waitUntil(lambda: resumed.step >= 450, timeout=20000)
    assert resumed.run_id == eng.run_id
    window.stop_run()
    wait_ended(qtbot, window)


# ---- the 2-D surface -----------------------------------------------------------------------------------
def test_surface_view_draws_the_live_path_and_keeps_earlier_ones(qtbot, window):
    load(qtbot, window, "surface_rosenbrock")
    lab = window.lab
    lab.show_panel("Surface")
    panel = lab.surface
    qtbot.waitUntil(lambda: panel.surface is not None, timeout=5000)
    assert "Rosenbrock" in panel.title.text() and panel.plot.isVisible()
    assert len(panel.minima.data) == 1 and len(panel._isos) > 5
    combo = window.controls.param_fields["surface"][0]
    assert isinstance(combo, QComboBox) and combo.findText("himmelblau") >= 0
    set_steps(window, 300)
    eng = start(qtbot, window)
    wait_ended(qtbot, window)
    qtbot.waitUntil(lambda: len(panel.path_points()[0]) == 300, timeout=5000)
    x, y = panel.path_points()
    assert x[-1] == pytest.approx(eng.probe_values["x"][-1]) and y[-1] == pytest.approx(eng.probe_values["y"][-1])
    px, py = panel.point.getData()
    assert (px[0], py[0]) == pytest.approx((x[-1], y[-1]))
    assert "step 299" in panel.readout.text()
    # a second run (momentum): the first path stays, faintly; slow motion limits the pace
    window.controls.momentum.setText("0.9")
    panel.set_pace(200.0)
    set_steps(window, 60)
    t0 = time.monotonic()
    start(qtbot, window)
    assert len(panel.kept) == 1 and panel.kept[0].label == "sgd lr 0.001"
    wait_ended(qtbot, window)
    assert time.monotonic() - t0 >= 0.25, "60 steps at 200 steps/s take 0.3 s"
    panel.set_pace(None)


def test_surface_view_follows_the_surface_knob(qtbot, window):
    load(qtbot, window, "surface_rosenbrock")
    panel = window.lab.surface
    combo = window.controls.param_fields["surface"][0]
    combo.setCurrentText("himmelblau")
    window.lab.wake()
    qtbot.waitUntil(lambda: panel.surface is not None and "Himmelblau" in panel.title.text(), timeout=5000)
    assert len(panel.minima.data) == 4


# ---- diagnostics ----------------------------------------------------------------------------------------
def test_diagnostics_show_a_verdict_and_per_layer_update_ratios(qtbot, window):
    load(qtbot, window, "regression")
    set_steps(window, 400)
    lab = window.lab
    lab.show_panel("Diagnostics")
    eng = start(qtbot, window)
    wait_ended(qtbot, window)
    panel = lab.diagnostics
    qtbot.waitUntil(lambda: panel.report is not None, timeout=5000)
    assert panel.report.verdict in ("ok", "overfitting", "underfitting")
    assert panel.report.verdict in panel.verdict.text() and len(panel.verdict_text.text()) > 20
    assert len(panel.val_curve.getData()[0]) == len(eng.validation)
    qtbot.waitUntil(lambda: "0.weight" in panel.layer_key.text(), timeout=5000)
    ratio, _grad = panel._layer_curves["0.weight"]
    ys = ratio.getData()[1]
    assert len(ys) >= 10 and np.nanmax(ys) < 0
    assert panel.reference.value() == -3
    # a second run with Adam: the first run's mean ratio stays as a dashed line to compare with
    window.controls.optimizer.setCurrentText("adam")
    window.controls.lr.set_value(0.003)
    set_steps(window, 100)
    start(qtbot, window)
    wait_ended(qtbot, window)
    qtbot.waitUntil(lambda: "previous: sgd m0.9 lr 0.05" in panel.layer_key.text(), timeout=5000)
    assert panel._previous is not None and len(panel._previous.getData()[0]) >= 10
    # ReduceLROnPlateau in one click: the schedule for the next start
    click(qtbot, panel.plateau_button)
    assert window.start_schedule().startswith("ReduceLROnPlateau")


# ---- notes and knobs --------------------------------------------------------------------------------------
def test_teaching_notes_render_lists_and_knob_choices(qtbot, window):
    load(qtbot, window, "surface_saddle")
    html = window.notes.toHtml()
    assert window.notes.toPlainText().startswith("2-D surface: a saddle point")
    assert "<li" in html and "What to try" in window.notes.toPlainText()
    assert "one of" in window.notes.toPlainText()
    combo = window.controls.param_fields["surface"][0]
    assert isinstance(combo, QComboBox) and combo.currentText() == "saddle"
    combo.setCurrentText("rastrigin")
    cfg = window.controls.config(window.experiment)
    assert cfg.params == {"surface": "rastrigin"}


def test_render_range_test_writes_png_svg_pdf(tmp_path):
    from lrviz.ui.render import render_range_test

    from lrviz.config import RunConfig
    from lrviz.experiment import load_experiment
    from lrviz.rangetest import find_lr

    exp = load_experiment("regression")
    result = find_lr(exp, RunConfig(**exp.defaults), start=1e-5, steps=60)
    for fmt in ("png", "svg", "pdf"):
        out = render_range_test(result, tmp_path / f"rt.{fmt}", title="LR range test")
        data = out.read_bytes()
        assert len(data) > 1000
    assert (tmp_path / "rt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "rt.svg").read_bytes()[:2000]
    assert (tmp_path / "rt.pdf").read_bytes()[:4] == b"%PDF"
