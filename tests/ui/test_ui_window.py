"""The main window driven as a person would: open, start, pause, steer, resume, compare, close.

Every run trains in a worker process of the app's pool (the ``pool`` fixture, shared); the tests
wait on what the window shows (answers, states, steps), never on the clock.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lrviz.ui.main_window import MainWindow
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDropEvent
from PySide6.QtWidgets import QApplication, QMessageBox
from window_driving import WAIT_MS, acked_step, button, click, type_into, wait_answer, wait_ended, wait_steps

from lrviz.states import RunState
from lrviz.store.runs import RunStore

pytestmark = pytest.mark.slow


def store_of(window: MainWindow) -> RunStore:
    assert window.store is not None
    return window.store


def test_steer_a_run_and_the_store_records_each_change_at_the_acked_step(qtbot, window, make_script, open_script):
    path = make_script("steer.py", steps=400, delay=0.003)
    open_script(path)
    assert window.windowTitle().startswith("steer")
    assert "What to try" in window.notes.toPlainText()

    click(qtbot, button(window, window.act_start))
    run = window.run
    assert run is not None and run in window.runs.started
    wait_steps(qtbot, window, 5)
    click(qtbot, button(window, window.act_pause))
    qtbot.waitUntil(lambda: run.state == RunState.PAUSED, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: window.act_pause.text() == "Resume")
    assert "pause paused before step" in wait_answer(qtbot, window, "pause")

    # Set the learning rate in the entry, Enter: the answer names the step it applies from.
    type_into(qtbot, window.controls.lr.edit, "0.02", enter=True)
    lr_step = acked_step(wait_answer(qtbot, window, "lr 0.02 from step"))
    assert lr_step == run.step  # paused after step lr_step - 1: the next one uses it
    assert f"lr 0.02 from step {lr_step}" in window.statusBar().currentMessage()
    # One step with it, then a schedule from the form.
    qtbot.waitUntil(window.act_step.isEnabled)  # as a person would: once the button is enabled
    click(qtbot, button(window, window.act_step))
    qtbot.waitUntil(lambda: run.step == lr_step + 1 and run.state == RunState.PAUSED, timeout=WAIT_MS)
    editor = window.controls.schedule
    editor.main.combo.setCurrentIndex(editor.main.combo.findData("StepLR"))
    type_into(qtbot, editor.main.fields["step_size"], "10")
    type_into(qtbot, editor.main.fields["gamma"], "0.5")
    assert editor.spec_edit.text() == "StepLR:step_size=10,gamma=0.5"
    assert editor.apply_button.isEnabled()
    assert len(editor.preview_values()) > 0
    click(qtbot, editor.apply_button)
    sched_step = acked_step(wait_answer(qtbot, window, "schedule StepLR"))
    qtbot.waitUntil(lambda: "In force from step" in editor.status.text())
    # Resume (Space) and let it finish.
    qtbot.keyClick(window, Qt.Key.Key_Space)
    wait_ended(qtbot, window)
    assert run.state == RunState.FINISHED, window.messages

    store = store_of(window)
    info = store.get_run(run.run_id)
    assert info.status == "finished"
    lr = store.load_steps(info.id)["lr"][:, 0]
    assert len(lr) == 400
    events = {(e.kind, e.step): e for e in store.load_events(info.id)}
    assert ("set_lr", lr_step) in events and events[("set_lr", lr_step)].data["lr"] == pytest.approx(0.02)
    assert ("set_schedule", sched_step) in events
    assert lr[lr_step - 1] == pytest.approx(0.05)
    assert lr[lr_step] == pytest.approx(0.02, rel=1e-12)  # exactly from the acked step
    assert lr[sched_step] == pytest.approx(0.02, rel=1e-12)  # StepLR starts from the current rate
    assert lr[sched_step + 10] == pytest.approx(0.01, rel=1e-12)
    assert lr[sched_step + 20] == pytest.approx(0.005, rel=1e-12)
    assert any(kind == "pause" for kind, _ in events)
    # The plots marked the interventions (from the run's live events).
    texts = window.plots.marker_texts()
    assert any("lr 0.02" in t for t in texts.values())
    assert any("StepLR" in t for t in texts.values())


def test_a_refused_command_shows_its_reason_and_the_run_goes_on(qtbot, window, make_script, open_script):
    open_script(make_script("adagrad.py", steps=100000, delay=0.002))
    window.controls.optimizer.setCurrentText("adagrad")
    click(qtbot, button(window, window.act_start))
    wait_steps(qtbot, window, 3)
    type_into(qtbot, window.controls.momentum, "0.5")
    click(qtbot, window.controls.apply_hyper)
    answer = wait_answer(qtbot, window, "momentum 0.5")
    assert "refused: Adagrad has no momentum to change" in answer
    assert "Adagrad has no momentum" in (window.controls.momentum.error() or "")
    step = window.run.step
    wait_steps(qtbot, window, step + 3)  # still training
    click(qtbot, button(window, window.act_stop))
    wait_ended(qtbot, window)
    assert window.run.state == RunState.STOPPED


def test_step_once_starts_a_paused_run_that_takes_exactly_one_step(qtbot, window, make_script, open_script):
    open_script(make_script("stepper.py", steps=50))
    click(qtbot, button(window, window.act_step))
    run = window.run
    assert "step once runs step 0" in wait_answer(qtbot, window, "step once")
    qtbot.waitUntil(lambda: run.state == RunState.PAUSED and run.step == 1, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: window.act_pause.text() == "Resume" and window.act_step.isEnabled())  # at the next tick
    click(qtbot, button(window, window.act_step))
    qtbot.waitUntil(lambda: run.step == 2 and run.state == RunState.PAUSED, timeout=WAIT_MS)
    click(qtbot, button(window, window.act_pause))  # Resume
    wait_ended(qtbot, window)
    assert run.state == RunState.FINISHED and len(run.buffer) == 50


def test_schedule_applied_before_the_start_becomes_the_run_schedule(qtbot, window, make_script, open_script):
    open_script(make_script("pre.py", steps=30))
    editor = window.controls.schedule
    editor.main.combo.setCurrentIndex(editor.main.combo.findData("ExponentialLR"))
    type_into(qtbot, editor.main.fields["gamma"], "0.9")
    click(qtbot, editor.apply_button)
    assert "At the start: ExponentialLR:gamma=0.9" in editor.status.toolTip()
    click(qtbot, button(window, window.act_start))
    wait_ended(qtbot, window)
    run = store_of(window).get_run(window.run.run_id)
    assert run.config["schedule"] == "ExponentialLR:gamma=0.9"
    lr = store_of(window).load_steps(run.id)["lr"][:, 0]
    assert lr[3] == pytest.approx(0.05 * 0.9**3)


def test_invalid_values_are_refused_at_the_field(qtbot, window, make_script, open_script):
    import numpy as np

    open_script(make_script("bad_values.py"))
    lr = window.controls.lr
    type_into(qtbot, lr.edit, "abc")
    assert not lr.edit.is_valid()
    assert "learning rate" in lr.edit.toolTip()
    assert "border" in lr.edit.styleSheet()
    assert lr.error_label.isVisible() and "learning rate" in lr.error_label.text()
    assert not window.start()  # refused, no traceback, nothing started
    assert window.run is None and not window.runs.started
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


def test_overlay_two_runs_and_open_one(qtbot, window, make_script, open_script):
    open_script(make_script("compare.py", steps=40))
    click(qtbot, button(window, window.act_start))
    wait_ended(qtbot, window)
    first = window.run.run_id
    type_into(qtbot, window.controls.lr.edit, "0.01", enter=True)
    click(qtbot, button(window, window.act_start))
    wait_ended(qtbot, window)
    second = window.run.run_id
    assert first != second

    browser = window.run_browser
    browser.refresh()
    browser.select_runs([first, second])
    click(qtbot, browser.overlay_button)
    plots = window.plots
    assert {o.trace.run_id for o in plots.overlays} == {first, second}
    assert len({o.colour for o in plots.overlays}) == 2
    legend = plots.legend_texts()
    assert any(f"#{first}" in t for t in legend) and any(f"#{second}" in t for t in legend)
    for o in plots.overlays:
        x, _ = o.curves["loss_smooth"].getData()
        assert x is not None and len(x) == 40
    # Opening one run shows it alone, from the store.
    browser.select_runs([first])
    click(qtbot, browser.open_button)
    assert plots.primary is not None and plots.primary.trace.run_id == first
    assert window.shown_run_id == first and window.run is None
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
    boxes = [b for b in shown if b.windowTitle() == "Cannot load the script"]
    assert len(boxes) == 1, "one message"
    box = boxes[0]
    assert box.icon() == QMessageBox.Icon.Critical
    assert f"{broken}:3: syntax error" in box.text()
    assert "good.py stays loaded" in box.text()
    assert "Traceback" in box.detailedText()  # the details, behind "Show Details…"
    assert window.script_info is not None and window.script_info.path.name == "good.py"
    # The previous experiment still starts and finishes.
    click(qtbot, button(window, window.act_start))
    wait_ended(qtbot, window)
    assert window.run.state == RunState.FINISHED


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
    assert window.run.state == RunState.FAILED
    box = shown[-1]
    assert "boom at the seventh batch" in box.text()
    assert str(script) in box.text()
    assert "Traceback" in box.detailedText()
    assert store_of(window).get_run(window.run.run_id).status == "failed"
    assert window.act_start.isEnabled()  # still usable


def test_settings_persist_and_recent_files(qtbot, tmp_path, make_script, shown, pool):
    path = make_script("remember.py")
    w = MainWindow(store_path=str(tmp_path / "store"), pool=pool)
    qtbot.addWidget(w)
    with qtbot.waitSignal(w.scriptLoaded, timeout=WAIT_MS):
        w.load_script(str(path))
    w.smoothing.setValue(85)
    w.log_checks["loss"].setChecked(True)
    w.close()
    w2 = MainWindow(store_path=str(tmp_path / "store"), pool=pool)
    qtbot.addWidget(w2)
    assert w2.smoothing.value() == 85
    assert w2.plots.smoothing == pytest.approx(0.85)
    assert w2.log_checks["loss"].isChecked() and w2.plots.log_y("loss")
    assert w2.prefs.recent_files()[0] == str(path.resolve())
    assert [a.text() for a in w2.scripts.recent_menu.actions()][0] == "remember.py"
    with qtbot.waitSignal(w2.scriptLoaded, timeout=WAIT_MS) as blocker:
        w2.load_script(None)  # no script given: the last one
    assert blocker.args[0] == str(path.resolve())
    w2.close()


def test_drop_a_script_and_reload_after_editing(qtbot, window, make_script):
    path = make_script("dropped.py", steps=11)
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    event = QDropEvent(QPointF(20, 20), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                       Qt.KeyboardModifier.NoModifier)
    with qtbot.waitSignal(window.scriptLoaded, timeout=WAIT_MS):
        window.dropEvent(event)
    assert window.script_info.path.name == "dropped.py"
    assert window.controls.length.value() == 11
    path.write_text(path.read_text().replace('"steps": 11', '"steps": 12'))
    with qtbot.waitSignal(window.scriptChanged, timeout=WAIT_MS):
        qtbot.keyClick(window, Qt.Key.Key_R, Qt.KeyboardModifier.ControlModifier)
    assert window.controls.length.value() == 12


def test_the_window_is_up_and_says_loading_until_the_worker_answers(qtbot, make_script, tmp_path, shown, pool):
    w = MainWindow(store_path=str(tmp_path / "store"), pool=pool)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    with qtbot.waitSignal(w.scriptLoaded, timeout=WAIT_MS):
        assert w.load_script(str(make_script("slowly.py")))
        assert w.status.state == "loading" and w.script_info is None  # asked, not answered yet
        assert not w.load_script(str(make_script("other.py")))  # one at a time
    assert w.script_info.name == "slowly" and w.status.state == "idle"
    from lrviz.devices import available_devices  # (the test may import torch; the app may not)

    devices = w.controls.device
    qtbot.waitUntil(lambda: [devices.itemText(i) for i in range(devices.count())] == available_devices())
    w.close()


def test_export_plot_and_data_at_full_fidelity(qtbot, window, make_script, open_script, tmp_path):
    open_script(make_script("export.py", steps=300))
    click(qtbot, button(window, window.act_start))
    wait_ended(qtbot, window)
    png = tmp_path / "plot.png"
    assert window.exports.export_plot(str(png), "png"), window.messages
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = tmp_path / "plot.svg"
    assert window.exports.export_plot(str(svg), "svg")
    assert b"<svg" in svg.read_bytes()[:2000]
    csv = tmp_path / "data.csv"
    assert window.exports.export_data(str(csv), "csv")
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("step,epoch,time,lr,loss")
    assert len(lines) >= 1 + 300  # every step, not the decimated view
    js = tmp_path / "run.json"
    assert window.exports.export_data(str(js), "json")
    assert '"events"' in js.read_text() and '"config"' in js.read_text()


def test_run_app_shows_the_window_then_loads_the_script(qtbot, make_script, tmp_path, shown):
    from lrviz.ui.app import run_app
    from PySide6.QtCore import QTimer

    path = make_script("launched.py")
    app = QApplication.instance()
    seen: dict[str, object] = {}

    def poll() -> None:
        wins = [w for w in app.topLevelWidgets() if isinstance(w, MainWindow) and w.isVisible()]
        if wins and "up" not in seen:
            seen["up"] = wins[0].script_info  # the window is shown before the script is answered
        if wins and wins[0].script_info is not None:
            seen["script"] = wins[0].script_info.path
            wins[0].close()
            return
        QTimer.singleShot(20, poll)

    QTimer.singleShot(0, poll)
    QTimer.singleShot(WAIT_MS, app.quit)  # never hang the suite
    assert run_app(str(path), str(tmp_path / "store")) == 0
    assert seen["up"] is None
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
    assert window.controls.batch_size.value() == 16  # the script's DEFAULTS
    window.controls.batch_size.setValue(32)
    type_into(qtbot, fields["delay"][0], "0.001")
    cfg = window.config()
    assert cfg.batch_size == 32 and cfg.params == {"delay": 0.001} and cfg.steps == 16 and cfg.epochs is None
    type_into(qtbot, fields["delay"][0], "fast")
    assert "delay" in (fields["delay"][0].error() or "")


def test_window_opens_with_no_run(window):
    assert window.run is None and window.script_info is None
    assert Path(window.store.path).exists()


def test_a_local_run_is_drawn_and_ended_like_any_other(qtbot, window, make_script, one_thread):
    from lrviz.config import RunConfig
    from lrviz.engine import TrainingEngine
    from lrviz.experiment import load_experiment
    from lrviz.live.run import LocalRun

    exp = load_experiment(make_script("local.py", steps=40))
    engine = TrainingEngine(exp, RunConfig(**exp.defaults).validated(), None)
    run = LocalRun(engine)
    with qtbot.waitSignal(window.runChanged) as changed:
        window.show_run(run)
    assert changed.args == [run] and window.run is run and window.is_active()
    with qtbot.waitSignal(window.runEnded, timeout=WAIT_MS) as ended:
        engine.start()
    assert ended.args == ["finished"]
    assert window.plots.primary.trace.rows == 40
    assert window.status.step_label.text() == "step 40 / 40" and window.status.state == "finished"


def test_a_rate_of_zero_shown_in_the_lr_field_does_not_raise(window):
    """A watched run warming up from 0 (the HF Trainer's default) has rate 0: showing it raised a math
    domain error, and the rest of the run's settings were never shown."""
    window.controls.lr.set_value(0.0)
    assert window.controls.lr.edit.text() == "0" and window.controls.lr.slider.value() == 0


def test_a_watched_adam_loop_shows_its_beta1_as_momentum(window):
    """lrviz's momentum is Adam's beta1 (lrviz.optim); a tracked AdamW loop records betas, not momentum."""
    from types import SimpleNamespace

    run = SimpleNamespace(describe={"kind": "tracked"}, events=[], lrs=[0.001], buffer=None,
                          config={"optimizer": "AdamW", "lr": 0.001, "betas": [0.85, 0.999], "weight_decay": 0.01,
                                  "steps": 700, "param_groups": 2})
    window.runs._show_settings_of(run)
    c = window.controls
    assert (c.momentum.text(), c.weight_decay.text(), c.length.value(), c.lr.value()) == ("0.85", "0.01", 700, 0.001)
    assert c.optimizer.currentText() == "adamw"
