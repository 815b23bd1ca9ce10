"""The lab in the real window on real child processes (the app's worker pool): the paths a person
takes end to end.

- a range test with nothing running: a paused child on a fresh model, tested, then stopped;
- a fork from the Fork panel: a child run from the parent's checkpoint (with no new settings it
  trains exactly as the parent did from there), and a resume of a stopped run that carries its
  earlier markers and validation points;
- a sweep of two rates: child runs one after another, rows from their Runs;
- the divergence banner on a child that diverges under the app's ``pause`` policy: "Roll back..."
  restores a checkpoint from before the rate was raised (never the pause checkpoint written after the
  bad steps) and says which, from the command's ack.

Every wait is on the runs' own events and acks; the WAIT ceilings only end a broken test.
"""

from __future__ import annotations

import numpy as np
import pytest
from lrviz.ui.lab.common import fmt
from lrviz.ui.main_window import MainWindow
from PySide6.QtCore import Qt

from lrviz.config import RunConfig
from lrviz.engine import TrainingEngine
from lrviz.experiment import load_experiment
from lrviz.guard import GuardConfig
from lrviz.live.child import ChildRun
from lrviz.states import EventKind, RunState
from lrviz.store.runs import RunStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

WAIT = 120_000  # ms


def click(qtbot, widget) -> None:
    qtbot.mouseClick(widget, Qt.MouseButton.LeftButton)


def load(qtbot, window: MainWindow, name: str) -> None:
    with qtbot.waitSignal(window.scriptChanged, timeout=WAIT):
        window.load_script(name)
    assert window.script_info is not None and window.script_info.name == name


def press_start(qtbot, window: MainWindow, steps: int) -> ChildRun:
    """Press Start with ``steps`` steps: a child run with the lab's options, shown by the window."""
    window.controls.length_kind.setCurrentText("steps")
    window.controls.length.setValue(steps)
    click(qtbot, window.toolbar.widgetForAction(window.act_start))
    run = window.run
    assert isinstance(run, ChildRun), window.messages
    return run


def wait_for(qtbot, pred, timeout: int = WAIT) -> None:
    qtbot.waitUntil(pred, timeout=timeout)


# ---- the range test on a fresh model ---------------------------------------------------------------------
def test_range_test_with_nothing_running_tests_a_paused_child_and_stops_it(qtbot, window):
    load(qtbot, window, "regression")
    panel = window.lab.range_test
    panel.confirm_mode.setCurrentIndex(2)  # never
    click(qtbot, panel.run_button)
    own = panel.own
    assert isinstance(own, ChildRun) and own.spec["start_paused"] and own.spec["store"] is None
    assert window.run is None  # not shown
    wait_for(qtbot, lambda: not panel.busy())
    assert panel.result is not None and panel.suggestions.best is not None, panel.errors.text()
    assert len(panel.raw_curve.getData()[0]) > 10
    wait_for(qtbot, own.done.is_set)
    assert own.state == RunState.STOPPED and own.step == 0  # tested, never trained
    assert own.worker.returncode is not None  # its process has ended
    assert window.store.list_runs() == []  # and it left no run behind


# ---- fork and resume ----------------------------------------------------------------------------------
def parent_run(store_path: str, steps: int = 300) -> int:
    """A finished run of ``regression`` with checkpoints every 100 steps, in the window's store."""
    exp = load_experiment("regression")
    cfg = RunConfig(**exp.defaults).merged({"steps": steps, "checkpoint_every": 100})
    with RunStore(store_path) as store:
        eng = TrainingEngine(exp, cfg, store)
        eng.run()
        assert eng.state == "finished"
        return eng.run_id


def test_fork_from_the_panel_is_a_child_from_the_checkpoint(qtbot, window):
    load(qtbot, window, "regression")
    parent = parent_run(window.store_path)
    panel = window.lab.fork
    window.lab.show_panel("Fork / resume")
    panel.refresh()
    panel.select_run(parent)
    assert panel.select_checkpoint(200)
    click(qtbot, panel.fork_button)  # no new settings: the parent's own course from step 200
    child = window.run
    assert isinstance(child, ChildRun) and child is panel.started, panel.errors.text()
    assert child.spec["origin"]["kind"] == "fork" and child.spec["origin"]["step"] == 200
    wait_for(qtbot, child.done.is_set)
    assert child.state == RunState.FINISHED, child.error
    info = window.store.get_run(child.run_id)
    assert info.parent_id == parent and info.fork_step == 200
    mine, theirs = window.store.load_steps(child.run_id), window.store.load_steps(parent)
    assert int(mine["step"][0]) == 200
    np.testing.assert_array_equal(mine["loss"], theirs["loss"][200:])  # exactly the parent's steps
    assert [o.trace.run_id for o in window.plots.overlays] == [parent]  # drawn over its parent

    # and with a new rate from the fork's step on
    panel.refresh()
    panel.select_run(parent)
    assert panel.select_checkpoint(200)
    panel.lr.setText("0.005")
    click(qtbot, panel.fork_button)
    second = window.run
    assert second is not child
    wait_for(qtbot, second.done.is_set)
    steps = window.store.load_steps(second.run_id)
    assert int(steps["step"][0]) == 200 and float(steps["lr"][0][0]) == pytest.approx(0.005)


def test_a_resumed_run_carries_its_earlier_markers_and_validation(qtbot, window):
    load(qtbot, window, "regression")
    run = press_start(qtbot, window, 3000)
    wait_for(qtbot, lambda: run.step >= 100)
    run.set_lr(0.04).result(WAIT / 1000)
    wait_for(qtbot, lambda: run.step >= 420)
    run.stop()
    wait_for(qtbot, run.done.is_set)
    assert run.state == RunState.STOPPED
    set_at = next(e.step for e in run.events if e.kind == EventKind.SET_LR)

    panel = window.lab.fork
    panel.refresh()
    panel.select_run(run.run_id)
    assert panel.resume_button.isEnabled()
    click(qtbot, panel.resume_button)
    resumed = window.run
    assert resumed is not run and resumed.spec["origin"]["kind"] == "resume", panel.errors.text()
    start = resumed.spec["origin"]["step"]
    wait_for(qtbot, lambda: resumed.step >= start + 40)
    assert resumed.run_id == run.run_id
    assert any(e.kind == EventKind.SET_LR and e.step == set_at and e.data["lr"] == 0.04 for e in resumed.events)
    wait_for(qtbot, lambda: any(p.step >= start for p in resumed.validation))
    assert any(p.step < start for p in resumed.validation)  # the points from before the resume


# ---- the sweep -----------------------------------------------------------------------------------------
def test_a_sweep_of_two_rates_runs_children_one_after_another(qtbot, window):
    load(qtbot, window, "regression")
    panel = window.lab.sweep
    panel.lrs.setText("0.01,3")
    panel.steps.setValue(150)
    click(qtbot, panel.run_button)
    first = panel._current.run
    assert isinstance(first, ChildRun) and window.run is not first
    wait_for(qtbot, lambda: not panel.busy())
    assert first.done.is_set()
    rows = panel.table_rows()
    assert [r[0].lstrip("■ ") for r in rows] == ["0.01", "3"], panel.errors.text()
    assert rows[0][1] == "finished" and rows[1][1] == "diverged" and rows[1][7] == "yes"
    stored = {r.id: r for r in window.store.list_runs()}
    assert {panel.rows[0].run_id, panel.rows[1].run_id} == set(stored)
    assert stored[panel.rows[0].run_id].status == "finished" and stored[panel.rows[1].run_id].status == "diverged"
    assert panel.rows[0].steps == 150 and len(window.store.load_steps(panel.rows[0].run_id)["loss"]) == 150


# ---- the divergence banner -------------------------------------------------------------------------------
def test_banner_rollback_on_a_child_restores_a_checkpoint_from_before_the_raised_rate(qtbot, window):
    load(qtbot, window, "regression")
    run = press_start(qtbot, window, 3000)
    assert run.config["divergence"] == "pause" and run.config["checkpoint_every"] == 200
    wait_for(qtbot, lambda: run.step >= 230)  # past the checkpoint of step 200
    raised_at = run.set_lr(0.5).result(WAIT / 1000)["step"]
    wait_for(qtbot, lambda: run.state == RunState.PAUSED and run.detection is not None)
    det = run.detection
    banner = window.lab.banner
    wait_for(qtbot, banner.isVisible)
    assert f"step {det['step']:,}" in banner.title.text() and banner.resume_after.isChecked()
    loss_before = float(np.mean(run.buffer.view()["loss"][raised_at - 20:raised_at]))

    click(qtbot, banner.rollback_button)
    wait_for(qtbot, lambda: banner.mode == "rolled_back")
    rb = next(e for e in run.events if e.kind == EventKind.ROLLBACK)
    window_start = det["step"] - GuardConfig().oscillation_window
    assert rb.data["to_step"] <= min(raised_at, window_start), (rb.data, det, raised_at)
    restored = f"restored step {rb.data['to_step']:,}, lr {fmt(rb.data['lr'])}"
    assert restored in banner.title.text(), banner.title.text()
    wait_for(qtbot, lambda: run.step >= rb.step + 30)  # resumed after the roll-back
    after = run.buffer.view()["loss"][rb.step:rb.step + 30]
    assert np.all(np.isfinite(after)) and float(np.mean(after)) < 3 * loss_before, (loss_before, after)
