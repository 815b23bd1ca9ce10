"""The controls of the built-in runner's update step (precision, accumulation, clipping), driven
through the real window: they reach the run's config at Start, a bad value is refused with its reason,
the clip is steered mid-run at an acked step, precision and accumulation are fixed while a run trains."""

from __future__ import annotations

import pytest
from lrviz.ui.controls import FIXED_FOR_A_RUN
from window_driving import WAIT_MS, acked_step, button, click, type_into, wait_answer, wait_ended, wait_steps

from lrviz.states import RunState

pytestmark = pytest.mark.slow


def test_start_with_accumulate_and_clip_stores_them_in_the_run_config(qtbot, window, make_script, open_script):
    open_script(make_script("acc.py", steps=12))
    controls = window.controls
    assert (controls.amp.currentData(), controls.accumulate.text(), controls.clip.text()) == (None, "1", "")
    type_into(qtbot, controls.accumulate, "2")
    type_into(qtbot, controls.clip, "0.5")
    controls.amp.setCurrentIndex(controls.amp.findData("bf16"))
    click(qtbot, button(window, window.act_start))
    wait_ended(qtbot, window)
    run = window.run
    assert run.state == RunState.FINISHED, window.messages
    info = window.store.get_run(run.run_id)
    assert (info.config["accumulate"], info.config["clip_grad_norm"], info.config["amp"]) == (2, 0.5, "bf16")
    assert info.steps == 12  # a step is an update of two micro-batches
    assert "clipped_steps" in info.summary


def test_defaults_fill_the_step_controls(qtbot, window, make_script, open_script):
    path = make_script("dflt.py", steps=12)
    path.write_text(path.read_text().replace('"batch_size": 16}',
                                             '"batch_size": 16, "accumulate": 3, "clip_grad_norm": 2.5, "amp": "bf16"}'))
    open_script(path)
    controls = window.controls
    assert (controls.amp.currentText(), controls.accumulate.text(), controls.clip.text()) == ("bf16", "3", "2.5")
    cfg = window.config()
    assert (cfg.amp, cfg.accumulate, cfg.clip_grad_norm) == ("bf16", 3, 2.5)
    # The controls override DEFAULTS, "off" included (None is not "keep the script's").
    controls.amp.setCurrentIndex(controls.amp.findData(None))
    type_into(qtbot, controls.clip, "off")
    cfg = window.config()
    assert (cfg.amp, cfg.clip_grad_norm) == (None, None)


@pytest.mark.parametrize("field, text, message", [
    ("accumulate", "0", "accumulate must be >= 1, not 0"),
    ("accumulate", "two", "accumulate must be a whole number, not 'two'"),
    ("clip", "-1", "clip grad norm must be a number > 0 such as 1.0 (or off), not '-1'"),
    ("clip", "inf", "clip grad norm must be a number > 0 such as 1.0 (or off), not 'inf'"),
])
def test_a_bad_step_setting_is_refused_with_its_reason(qtbot, window, make_script, open_script, field, text, message):
    open_script(make_script("bad.py", steps=12))
    controls = window.controls
    type_into(qtbot, getattr(controls, field), text)
    assert getattr(controls, field).error() == message
    assert controls.step_errors.isVisible() and controls.step_errors.toolTip() == message
    click(qtbot, button(window, window.act_start))
    assert window.run is None  # nothing started
    assert message in window.statusBar().currentMessage()
    type_into(qtbot, getattr(controls, field), "2")  # put right: it starts
    click(qtbot, button(window, window.act_start))
    wait_ended(qtbot, window)
    assert window.run.state == RunState.FINISHED, window.messages


def test_clip_changed_mid_run_lands_at_the_acked_step(qtbot, window, make_script, open_script):
    open_script(make_script("clip.py", steps=100_000, delay=0.002))
    controls = window.controls
    type_into(qtbot, controls.clip, "0.5")
    assert not controls.apply_clip.isVisible()  # before a run the field is read at Start
    click(qtbot, button(window, window.act_start))
    run = window.run
    wait_steps(qtbot, window, 3)
    # precision and accumulation are fixed for the run, and say why; the clip can be applied
    assert not controls.amp.isEnabled() and controls.amp.toolTip() == FIXED_FOR_A_RUN
    assert not controls.accumulate.isEnabled() and controls.accumulate.toolTip() == FIXED_FOR_A_RUN
    assert controls.clip.isEnabled() and controls.apply_clip.isVisible()

    type_into(qtbot, controls.clip, "0.1")
    click(qtbot, controls.apply_clip)
    step = acked_step(wait_answer(qtbot, window, "clip grad norm 0.1 from step"))
    qtbot.waitUntil(lambda: controls.clip_status.text() == f"clip grad norm 0.1 from step {step}")
    assert f"clip grad norm 0.1 from step {step}" in window.statusBar().currentMessage()
    # a bad value mid-run: refused at the field, nothing sent
    type_into(qtbot, controls.clip, "-3")
    click(qtbot, controls.apply_clip)
    assert "clip grad norm must be a number > 0" in (controls.clip.error() or "")
    # empty: stop clipping (Return applies too)
    type_into(qtbot, controls.clip, "", enter=True)
    off_step = acked_step(wait_answer(qtbot, window, "no clipping from step"))
    wait_steps(qtbot, window, off_step + 2)
    click(qtbot, button(window, window.act_stop))
    wait_ended(qtbot, window)
    assert run.state == RunState.STOPPED
    assert controls.amp.isEnabled() and controls.accumulate.isEnabled() and not controls.apply_clip.isVisible()

    events = [(e.kind, e.step, e.data) for e in window.store.load_events(run.run_id) if e.kind == "set_clip"]
    assert events == [("set_clip", step, {"clip_grad_norm": 0.1}), ("set_clip", off_step, {"clip_grad_norm": None})]
    assert not any(e.data.get("clip_grad_norm") == -3 for e in window.store.load_events(run.run_id))


def test_fp16_on_a_cpu_only_machine_shows_why_and_the_app_carries_on(qtbot, window, make_script, open_script,
                                                                    shown):
    open_script(make_script("fp16.py", steps=12))
    controls = window.controls
    controls.device.setCurrentText("cpu")
    controls.amp.setCurrentIndex(controls.amp.findData("fp16"))
    click(qtbot, button(window, window.act_start))
    qtbot.waitUntil(lambda: bool(shown), timeout=WAIT_MS)  # the run's answer: one message box
    box = shown[0]
    assert "fp16 needs a CUDA GPU" in box.text(), box.text()
    assert box.windowTitle() == "The run did not start"
    assert "use bf16" in box.text() and "Nothing was stored" in box.text() and "Traceback" not in box.text()
    assert window.store.list_runs() == []  # refused before a run was made
    assert not window.is_active()
    # the app carries on: bf16 trains
    controls.amp.setCurrentIndex(controls.amp.findData("bf16"))
    click(qtbot, button(window, window.act_start))
    wait_ended(qtbot, window)
    assert window.run.state == RunState.FINISHED, window.messages


def test_watching_a_run_shows_its_step_settings_and_the_clip_in_force(qtbot, window):
    import subprocess
    import sys
    from pathlib import Path

    from test_live_app import ROOT, SCRIPTS, lrviz_run, wait_live
    from window_driving import CHILD_ENV

    store = Path(window.store_path).parent
    proc = lrviz_run(str(SCRIPTS / "tiny.py"), "--steps", "3000000", "--amp", "bf16", "--accumulate", "2",
                     "--clip-grad-norm", "0.5", store=store)
    try:
        run_id = wait_live(qtbot, store, proc)
        steered = subprocess.run([sys.executable, "-m", "lrviz", "steer", str(run_id), "--clip-grad-norm", "0.25",
                                  "--store", str(store)], cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True)
        assert steered.returncode == 0, steered.stderr
        step = int(steered.stdout.split("from step")[1].split()[0])
        window.runs.watch(run_id)
        qtbot.waitUntil(lambda: window.run is not None and window.run.run_id == run_id, timeout=WAIT_MS)
        controls = window.controls
        qtbot.waitUntil(lambda: controls.length.value() == 3_000_000, timeout=WAIT_MS)  # its settings shown
        assert (controls.amp.currentText(), controls.accumulate.text()) == ("bf16", "2")
        assert controls.clip.text() == "0.25"  # steered: the threshold in force, not the one it started with
        assert controls.clip_status.text() == f"clip grad norm 0.25 from step {step}"
        assert not controls.amp.isEnabled() and not controls.accumulate.isEnabled()
        click(qtbot, button(window, window.act_stop))
        wait_ended(qtbot, window)
        assert proc.wait(WAIT_MS / 1000) == 0
    finally:
        proc.kill()


def test_a_run_that_ended_before_the_app_attached_shows_its_own_reason(qtbot, window, make_script, open_script,
                                                                       shown, monkeypatch):
    """Under load the fp16 refusal once ended the run before the window attached: it showed "cannot attach
    to the training process: ... Connection reset by peer". The attach here fails that way on purpose,
    after the run has ended: the run's own reason is shown."""
    from lrviz.live.child import ChildRun
    from lrviz.live.run import NotLive

    def late_connect(self, timeout=5.0):
        # the run ends first: its worker exits. (Not a wait on worker.ended: this runs in the thread that
        # reads the worker's messages, so "ended" is read only after this returns.)
        self.worker.proc.wait(WAIT_MS / 1000)
        raise NotLive("the run did not answer properly: [Errno 104] Connection reset by peer")

    monkeypatch.setattr(ChildRun, "connect", late_connect)
    open_script(make_script("fp16.py", steps=12))
    window.controls.device.setCurrentText("cpu")
    window.controls.amp.setCurrentIndex(window.controls.amp.findData("fp16"))
    click(qtbot, button(window, window.act_start))
    qtbot.waitUntil(lambda: bool(shown), timeout=WAIT_MS)
    text = shown[0].text()
    assert "fp16 needs a CUDA GPU" in text and "Connection reset" not in text, text
