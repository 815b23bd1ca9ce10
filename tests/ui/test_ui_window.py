"""The main window driven as a person would: open, start, pause, steer, resume, compare, close."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from lrviz.ui.main_window import MainWindow
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDropEvent
from PySide6.QtWidgets import QApplication, QMessageBox

from lrviz.store import RunStore


def click(qtbot, widget) -> None:
    qtbot.mouseClick(widget, Qt.MouseButton.LeftButton)


def button(window: MainWindow, action) -> object:
    return window.toolbar.widgetForAction(action)


def type_into(qtbot, field, text: str, enter: bool = False) -> None:
    field.setFocus()
    field.selectAll()
    qtbot.keyClick(field, Qt.Key.Key_Backspace)
    qtbot.keyClicks(field, text)
    if enter:
        qtbot.keyClick(field, Qt.Key.Key_Return)


def wait_ended(qtbot, window: MainWindow, timeout: int = 30000) -> None:
    qtbot.waitUntil(lambda: window.engine is not None and window._end_handled, timeout=timeout)


def store_of(window: MainWindow) -> RunStore:
    assert window.store is not None
    return window.store


def test_steer_a_run_and_the_store_records_each_change(qtbot, window, make_script, open_script):
    path = make_script("steer.py", steps=400, delay=0.003)
    open_script(path)
    assert window.windowTitle().startswith("steer")
    assert "What to try" in window.notes.toPlainText()

    click(qtbot, button(window, window.act_start))
    eng = window.engine
    assert eng is not None
    qtbot.waitUntil(lambda: eng.step >= 5, timeout=20000)
    click(qtbot, button(window, window.act_pause))
    qtbot.waitUntil(lambda: eng.state == "paused", timeout=10000)
    assert button(window, window.act_pause).text() == "Resume" or window.act_pause.text() == "Resume"

    # Set the learning rate in the entry, Enter: it applies from the next step.
    lr_step = eng.step
    type_into(qtbot, window.controls.lr.edit, "0.02", enter=True)
    qtbot.waitUntil(lambda: window.controls.lr.slider.value() > 0)
    # One step with it, then a schedule from the form.
    qtbot.waitUntil(window.act_step.isEnabled)  # as a person would: once the button is enabled
    click(qtbot, button(window, window.act_step))
    qtbot.waitUntil(lambda: eng.step == lr_step + 1 and eng.state == "paused", timeout=10000)
    editor = window.controls.schedule
    editor.main.combo.setCurrentIndex(editor.main.combo.findData("StepLR"))
    type_into(qtbot, editor.main.fields["step_size"], "10")
    type_into(qtbot, editor.main.fields["gamma"], "0.5")
    assert editor.spec_edit.text() == "StepLR:step_size=10,gamma=0.5"
    assert editor.apply_button.isEnabled()
    assert len(editor.preview_values()) > 0
    sched_step = eng.step
    click(qtbot, editor.apply_button)
    assert "In force" in editor.status.text()
    # Resume (Space) and let it finish.
    qtbot.keyClick(window, Qt.Key.Key_Space)
    wait_ended(qtbot, window)
    assert eng.state == "finished", window.messages

    store = store_of(window)
    run = store.get_run(eng.run_id)
    assert run.status == "finished"
    steps = store.load_steps(run.id)
    lr = steps["lr"][:, 0]
    assert len(lr) == 400
    events = {(e.kind, e.step): e for e in store.load_events(run.id)}
    assert ("set_lr", lr_step) in events and events[("set_lr", lr_step)].data["lr"] == pytest.approx(0.02)
    assert ("set_schedule", sched_step) in events
    assert lr[lr_step - 1] == pytest.approx(0.05)
    assert lr[lr_step] == pytest.approx(0.02, rel=1e-12)  # the first step after the change
    assert lr[sched_step] == pytest.approx(0.02, rel=1e-12)  # StepLR starts from the current rate
    assert lr[sched_step + 10] == pytest.approx(0.01, rel=1e-12)
    assert lr[sched_step + 20] == pytest.approx(0.005, rel=1e-12)
    assert any(kind == "pause" for kind, _ in events)
    # The plots marked the interventions.
    texts = window.plots.marker_texts()
    assert "lr 0.02" in texts.values() or any("lr 0.02" in t for t in texts.values())
    assert any("StepLR" in t for t in texts.values())


def test_schedule_applied_before_the_start_becomes_the_run_schedule(qtbot, window, make_script, open_script):
    open_script(make_script("pre.py", steps=30))
    editor = window.controls.schedule
    editor.main.combo.setCurrentIndex(editor.main.combo.findData("ExponentialLR"))
    type_into(qtbot, editor.main.fields["gamma"], "0.9")
    click(qtbot, editor.apply_button)
    assert "At the start: ExponentialLR:gamma=0.9" in editor.status.toolTip()
    click(qtbot, button(window, window.act_start))
    wait_ended(qtbot, window)
    run = store_of(window).get_run(window.engine.run_id)
    assert run.config["schedule"] == "ExponentialLR:gamma=0.9"
    lr = store_of(window).load_steps(run.id)["lr"][:, 0]
    assert lr[3] == pytest.approx(0.05 * 0.9**3)


def test_invalid_values_are_refused_at_the_field(qtbot, window, make_script, open_script):
    open_script(make_script("bad_values.py"))
    lr = window.controls.lr
    type_into(qtbot, lr.edit, "abc")
    assert not lr.edit.is_valid()
    assert "learning rate" in lr.edit.toolTip()
    assert "border" in lr.edit.styleSheet()
    assert lr.error_label.isVisible() and "learning rate" in lr.error_label.text()
    assert not window.start_run()  # refused, no traceback, nothing started
    assert window.engine is None
    type_into(qtbot, lr.edit, "3e-4")
    assert lr.edit.is_valid() and lr.edit.styleSheet() == ""
    expected = round((np.log10(3e-4) + 6) / 7 * lr.TICKS)
    assert lr.slider.value() == expected
    lr.slider.setValue(lr.TICKS)  # the slider drives the entry too
    assert lr.edit.text() == "10"

    editor = window.controls.schedule
    editor.main.combo.setCurrentIndex(editor.main.combo.findData("StepLR"))
    type_into(qtbot, editor.main.fields["step_size"], "0")
    assert not editor.apply_button.isEnabled()
    field = editor.main.fields["step_size"]
    assert field.error() and "step_size" in field.error()
    assert "border" in field.styleSheet()
    type_into(qtbot, editor.spec_edit, "NoSuchLR:x=1")
    assert "unknown schedule" in (editor.spec_edit.error() or "")
    type_into(qtbot, window.controls.momentum, "1.5")
    assert "momentum" in (window.controls.momentum.error() or "")
    assert window.controls.optimizer_errors.isVisible()


def test_overlay_two_runs(qtbot, window, make_script, open_script):
    open_script(make_script("compare.py", steps=40))
    click(qtbot, button(window, window.act_start))
    wait_ended(qtbot, window)
    first = window.engine.run_id
    type_into(qtbot, window.controls.lr.edit, "0.01", enter=True)
    click(qtbot, button(window, window.act_start))
    wait_ended(qtbot, window)
    second = window.engine.run_id
    assert first != second

    browser = window.run_browser
    if browser is not None:
        browser.refresh()
        browser.select_runs([first, second])
        click(qtbot, browser.overlay_button)
    else:  # pragma: no cover - the run browser is another module
        window.overlay_runs([first, second])
    plots = window.plots
    assert [o.trace.run_id for o in plots.overlays] == sorted([first, second]) or \
        {o.trace.run_id for o in plots.overlays} == {first, second}
    colours = {o.colour for o in plots.overlays}
    assert len(colours) == 2
    legend = plots.legend_texts()
    assert any(f"#{first}" in t for t in legend) and any(f"#{second}" in t for t in legend)
    for o in plots.overlays:
        x, y = o.curves["loss_smooth"].getData()
        assert x is not None and len(x) == 40
    # Opening one run shows it alone, from the store.
    if browser is not None:
        browser.select_runs([first])
        click(qtbot, browser.open_button)
    else:  # pragma: no cover
        window.open_run(first)
    assert plots.primary is not None and plots.primary.trace.run_id == first
    assert f"#{first}" in window.view_label.text()


def test_a_broken_script_shows_file_and_line_and_the_app_keeps_working(
        qtbot, window, make_script, open_script, shown):
    good = make_script("good.py", steps=20)
    open_script(good)
    broken = make_script("broken.py", source="""\
        import torch

        def build_model(:
            return None
        """)
    open_script(broken, ok=False)
    assert shown, "no message box"
    box = shown[-1]
    assert box.icon() == QMessageBox.Icon.Critical
    assert str(broken) in box.text() and ":3:" in box.text()
    assert "syntax error" in box.text()
    assert "good.py stays loaded" in box.text()
    assert window.experiment is not None and window.experiment.path.name == "good.py"
    # The previous experiment still starts and finishes.
    click(qtbot, button(window, window.act_start))
    wait_ended(qtbot, window)
    assert window.engine.state == "finished"


def test_an_error_during_training_is_a_message_with_details_and_the_run_is_saved_failed(
        qtbot, window, make_script, open_script, shown):
    script = make_script("explodes.py", source='''\
        import torch
        from torch import nn

        DEFAULTS = {"steps": 50}
        CALLS = [0]


        def build_model():
            return nn.Linear(2, 1)


        def build_data():
            return [(torch.randn(4, 2), torch.randn(4, 1))] * 5


        def loss_fn(out, target):
            CALLS[0] += 1
            if CALLS[0] == 7:
                raise RuntimeError("boom at the seventh batch")
            return ((out - target) ** 2).mean()
        ''')
    open_script(script)
    click(qtbot, button(window, window.act_start))
    wait_ended(qtbot, window)
    assert window.engine.state == "failed"
    box = shown[-1]
    assert "boom at the seventh batch" in box.text()
    assert str(script) in box.text()
    assert "Traceback" in box.detailedText()
    assert store_of(window).get_run(window.engine.run_id).status == "failed"
    # Still usable: start again (it fails the same way, but the app is alive and responsive).
    assert window.act_start.isEnabled()


def test_closing_mid_run_stops_the_engine_and_saves_the_run(qtbot, window, make_script, open_script,
                                                           monkeypatch):
    open_script(make_script("long.py", steps=100000, delay=0.002))
    click(qtbot, button(window, window.act_start))
    eng = window.engine
    qtbot.waitUntil(lambda: eng.step >= 3, timeout=20000)
    answers = [QMessageBox.StandardButton.No, QMessageBox.StandardButton.Yes]
    asked: list[str] = []

    def question(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        asked.append(args[1])
        return answers.pop(0)

    monkeypatch.setattr(QMessageBox, "question", staticmethod(question))
    window.close()  # "No": keeps training
    assert window.isVisible() and eng.is_alive
    window.close()  # "Yes": stops, waits for the thread, closes
    assert asked == ["Training is running", "Training is running"]
    assert not window.isVisible()
    assert not eng.is_alive
    assert not [t for t in threading.enumerate() if t.name == "lrviz-engine"]
    info = RunStore(window.store.path).get_run(eng.run_id)
    assert info.status == "stopped" and info.steps == eng.step


def test_settings_persist_and_recent_files(qtbot, tmp_path, make_script, shown):
    path = make_script("remember.py")
    w = MainWindow(store_path=str(tmp_path / "store"))
    qtbot.addWidget(w)
    with qtbot.waitSignal(w.scriptLoaded, timeout=30000):
        w.load_script(str(path))
    w.smoothing.setValue(85)
    w.log_checks["loss"].setChecked(True)
    w.close()
    w2 = MainWindow(store_path=str(tmp_path / "store"))
    qtbot.addWidget(w2)
    assert w2.smoothing.value() == 85
    assert w2.plots.smoothing == pytest.approx(0.85)
    assert w2.log_checks["loss"].isChecked() and w2.plots.log_y("loss")
    assert w2.recent_files()[0] == str(path.resolve())
    assert [a.text() for a in w2.recent_menu.actions()][0] == "remember.py"
    with qtbot.waitSignal(w2.scriptLoaded, timeout=30000) as blocker:
        w2.load_script(None)  # no script given: the last one
    assert blocker.args[0] == str(path.resolve())
    w2.close()


def test_drop_a_script_and_reload_after_editing(qtbot, window, make_script):
    path = make_script("dropped.py", steps=11)
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    event = QDropEvent(QPointF(20, 20), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                       Qt.KeyboardModifier.NoModifier)
    with qtbot.waitSignal(window.scriptLoaded, timeout=30000):
        window.dropEvent(event)
    assert window.experiment.path.name == "dropped.py"
    assert window.controls.length.value() == 11
    path.write_text(path.read_text().replace('"steps": 11', '"steps": 12'))
    with qtbot.waitSignal(window.scriptLoaded, timeout=30000):
        qtbot.keyClick(window, Qt.Key.Key_R, Qt.KeyboardModifier.ControlModifier)
    assert window.controls.length.value() == 12


def test_export_plot_and_data_at_full_fidelity(qtbot, window, make_script, open_script, tmp_path):
    open_script(make_script("export.py", steps=300))
    click(qtbot, button(window, window.act_start))
    wait_ended(qtbot, window)
    png = tmp_path / "plot.png"
    assert window.export_plot(str(png), "png"), window.messages
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = tmp_path / "plot.svg"
    assert window.export_plot(str(svg), "svg")
    assert b"<svg" in svg.read_bytes()[:2000]
    csv = tmp_path / "data.csv"
    assert window.export_data(str(csv), "csv")
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("step,epoch,time,lr,loss")
    assert len(lines) >= 1 + 300  # every step, not the decimated view
    js = tmp_path / "run.json"
    assert window.export_data(str(js), "json")
    assert '"events"' in js.read_text() and '"config"' in js.read_text()


def test_run_app_shows_the_window_then_loads_the_script(qtbot, make_script, tmp_path, shown):
    from lrviz.ui.app import run_app
    from PySide6.QtCore import QTimer

    path = make_script("launched.py")
    app = QApplication.instance()
    seen: dict[str, object] = {}

    def poll() -> None:
        wins = [w for w in app.topLevelWidgets() if isinstance(w, MainWindow) and w.isVisible()]
        if wins and wins[0].experiment is not None:
            seen["script"] = wins[0].experiment.path
            wins[0].close()
            return
        QTimer.singleShot(20, poll)

    QTimer.singleShot(0, poll)
    QTimer.singleShot(30000, app.quit)  # never hang the suite
    assert run_app(str(path), str(tmp_path / "store")) == 0
    assert seen["script"] == path.resolve()


def test_readout_and_crosshair_show_the_values_at_a_step(qtbot, window, make_script, open_script):
    open_script(make_script("readout.py", steps=50))
    click(qtbot, button(window, window.act_start))
    wait_ended(qtbot, window)
    window.plots.show_crosshair(10)
    text = window.plots.readout.text()
    assert "step 10" in text and "loss" in text and "lr 0.05" in text
    window.plots.show_crosshair(-1)
    assert window.plots.readout.text().strip() == ""


def test_script_params_form_and_batch_size(qtbot, window, make_script, open_script):
    open_script(make_script("knobs.py", steps=16))
    fields = window.controls.param_fields
    assert "delay" in fields and window.controls.params_group.isVisible()
    assert window.controls.batch_size.isEnabled()
    window.controls.batch_size.setValue(32)
    type_into(qtbot, fields["delay"][0], "0.001")
    cfg = window.controls.config(window.experiment)
    assert cfg.batch_size == 32 and cfg.params == {"delay": 0.001} and cfg.steps == 16 and cfg.epochs is None
    type_into(qtbot, fields["delay"][0], "fast")
    assert "delay" in (fields["delay"][0].error() or "")


def test_window_opens_with_no_engine_thread(window):
    assert window.engine is None
    assert Path(window.store.path).exists()
