"""The learning-rate lab panels on runs read through the Run interface, driven as a person would.

The panels sit in :class:`lab_host.LabHost`, which offers them the window's seam and nothing else;
its runs are :class:`lrviz.live.run.LocalRun`s of engines trained in threads (fast). Range test
(live run and fresh model, band, "Use this LR" through the run), sweep (rows as ``lrviz sweep``
computes them, Stop), the divergence banner (roll back from its button: the ack says what was
restored), the 2-D surface view (the worker's grid, the run's probes, slow motion), diagnostics
(verdict, per-layer ratios), the notes, and the registry of panels with no timer of their own.
End-to-end paths with real child processes are in ``test_lab_live.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lab_host import host_fixture  # noqa: F401  (the ``host`` fixture)
from lrviz.ui.lab import panels as lab_module
from lrviz.ui.lab.common import LabPanel, fmt
from lrviz.ui.lab.notes import notes_html
from lrviz.ui.lab.panels import PANELS, Lab, Panel
from PySide6.QtCore import QObject, Qt, QTimer

from lrviz.config import RunConfig
from lrviz.experiment import load_experiment
from lrviz.lab.rangecurve import METHODS
from lrviz.lab.sweep import run_sweep
from lrviz.states import EventKind, RunState

SCRIPTS = Path(__file__).parents[1] / "scripts"
WAIT = 60000  # ms: only a ceiling for a broken test

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def click(qtbot, widget) -> None:
    qtbot.mouseClick(widget, Qt.MouseButton.LeftButton)


def type_into(qtbot, field, text: str) -> None:
    field.setFocus()
    field.selectAll()
    qtbot.keyClick(field, Qt.Key.Key_Backspace)
    qtbot.keyClicks(field, text)


def wait_done(qtbot, run, timeout: int = WAIT) -> None:
    qtbot.waitUntil(run.done.is_set, timeout=timeout)


def paused_run(qtbot, host, script="regression", steps=3000, at=0, **config):
    """A run of ``script`` shown in the host, paused before step ``at`` exactly (one step at a time)."""
    host.load(script)
    host.overrides.update({"steps": steps, "epochs": None, **config})
    run = host.start(start_paused=True)
    for k in range(1, at + 1):
        run.step_once().result(WAIT / 1000)
        qtbot.waitUntil(lambda k=k: run.step == k and run.state == RunState.PAUSED, timeout=WAIT)
    qtbot.waitUntil(lambda: run.state == RunState.PAUSED, timeout=WAIT)
    assert run.step == at
    return run


# ---- the registry and the one timer ---------------------------------------------------------------------
def test_panels_come_from_one_table_and_tick_from_the_window_timer(qtbot, host, monkeypatch):
    lab = host.lab
    for entry in PANELS:
        panel = getattr(lab, entry.key)
        assert lab.panels[entry.key] is panel and isinstance(panel, entry.cls)
        dock = lab.docks[entry.title]
        assert dock.widget() is panel and dock.objectName() == entry.dock and dock.windowTitle() == entry.title
    # no timer of its own anywhere in the lab: the window's ticks drive it
    assert not [t for t in lab.findChildren(QTimer)] and not any(p.findChildren(QTimer) for p in lab.panels.values())
    ticks = []

    class Counter(LabPanel):
        def tick(self, run):
            ticks.append(run)

    # adding a panel is one entry
    monkeypatch.setattr(lab_module, "PANELS", (*PANELS, Panel("counter", "Counter", "counterDock", Counter)))
    other = Lab(host)
    host.ticked.disconnect(lab.tick)  # only the new lab follows the host now
    other.install()
    assert isinstance(other.counter, Counter) and other.docks["Counter"].objectName() == "counterDock"
    host.ticked.emit()
    assert ticks == [None]
    assert isinstance(other, QObject)


# ---- the range test ----------------------------------------------------------------------------------
def test_range_test_on_a_fresh_model_draws_the_band_and_stops_its_own_run(qtbot, host):
    host.load("regression")
    lab = host.lab
    panel = lab.range_test
    assert "fresh model from regression.py" in panel.mode_label.text()
    panel.confirm_mode.setCurrentIndex(2)  # never: the band alone
    click(qtbot, panel.run_button)
    assert panel.busy() and panel.own is not None
    own = panel.own
    assert own is not host.run and own.engine.store is None  # not stored, not shown
    qtbot.waitUntil(lambda: not panel.busy(), timeout=WAIT)
    result, s = panel.result, panel.suggestions
    assert result is not None and s is not None and s.best is not None, panel.errors.text()
    wait_done(qtbot, own)
    assert own.state == RunState.STOPPED and own.engine.steps_done == 0  # tested, never trained
    assert host.store.list_runs() == []
    # the curve drawn is the run's: every finite point, and the suggestions as a band and lines
    x, y = panel.raw_curve.getData()
    good = np.isfinite(result.losses)
    np.testing.assert_allclose(10 ** np.asarray(x), result.lrs[good])
    np.testing.assert_array_equal(y, result.losses[good])
    lo, hi = s.band()
    assert panel.band.getRegion() == pytest.approx((math.log10(lo), math.log10(hi)))
    drawn = [m for m in METHODS if s.values()[m] is not None]
    assert set(panel.lines) == set(drawn) and len(drawn) >= 2
    assert "✔" in panel.lines[s.chosen].label.format
    # another method highlights another line, without running again
    other = next(m for m in drawn if m != s.chosen)
    panel.method.setCurrentIndex(panel.method.findData(other))
    assert panel.suggestions.chosen == other and "✔" in panel.lines[other].label.format
    # nothing runs: "Use this LR" sets the rate the next Start uses
    expected = float(f"{panel.chosen_lr():.3g}")
    click(qtbot, panel.use_button)
    assert host.controls.lr.value() == pytest.approx(expected) and host.config().lr == pytest.approx(expected)


def test_range_test_says_why_there_is_no_suggestion(qtbot, host):
    host.load("regression")
    panel = host.lab.range_test
    type_into(qtbot, panel.start, "1e-9")
    type_into(qtbot, panel.end, "1e-8")  # far too low for the loss to fall
    type_into(qtbot, panel.steps, "30")
    click(qtbot, panel.run_button)
    qtbot.waitUntil(lambda: not panel.busy(), timeout=WAIT)
    assert panel.result is not None and panel.suggestions.best is None
    assert "no suggestion:" in panel.suggestion_label.text() and panel.suggestions.reason
    assert panel.band is None and not panel.lines
    assert not panel.use_button.isEnabled() and not panel.confirm_button.isEnabled()
    assert panel.stop_label.text() == "Ran all 30 steps up to 1e-8."


def test_range_test_on_a_paused_run_restores_its_weights_and_use_this_lr_goes_to_the_run(qtbot, host):
    run = paused_run(qtbot, host, at=5)  # early: from these weights the loss still falls in a test
    eng = run.engine
    before = {k: v.clone() for k, v in eng.model.state_dict().items()}
    step = run.step
    panel = host.lab.range_test
    host.ticked.emit()
    assert f"live run's current weights at step {step:,}" in panel.mode_label.text()
    type_into(qtbot, panel.steps, "60")
    panel.confirm_mode.setCurrentIndex(2)
    click(qtbot, panel.run_button)
    assert panel.target is run and panel.own is None
    qtbot.waitUntil(lambda: not panel.busy(), timeout=WAIT)
    assert panel.result is not None and len(panel.result.lrs) > 10
    assert run.step == step and run.state == RunState.PAUSED
    for k, v in eng.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(e.kind == EventKind.RANGE_TEST for e in run.events)
    assert panel.chosen_lr() is not None, panel.suggestions.reason
    expected = float(f"{panel.chosen_lr():.3g}")
    click(qtbot, panel.use_button)  # through the LR control, which sends it to the run
    ack = host.sent[-1].result(WAIT / 1000)
    assert ack["kind"] == "set_lr" and ack["step"] == step
    assert run.lrs[0] == pytest.approx(expected) and run.state == RunState.PAUSED


def test_confirmation_on_a_paused_run_goes_through_the_run_and_restores_it(qtbot, host):
    run = paused_run(qtbot, host, at=5)
    eng = run.engine
    before = {k: v.clone() for k, v in eng.model.state_dict().items()}
    opt_before = {k: v.clone() for k, v in eng.optimizer.state_dict()["state"][0].items()}
    panel = host.lab.range_test
    panel.confirm_mode.setCurrentIndex(1)  # always
    click(qtbot, panel.run_button)
    qtbot.waitUntil(lambda: not panel.busy(), timeout=WAIT)
    assert panel.result.suggestions.reason is None, panel.result.suggestions.reason
    assert panel.result.confirmation is not None
    click(qtbot, panel.confirm_button)  # once more, on its own: the confirm_lr command
    assert panel.busy() and "confirming" in panel.confirm_label.text()
    qtbot.waitUntil(lambda: not panel.busy(), timeout=WAIT)
    c = panel.result.confirmation
    assert c.steps == 20 and c.reason in panel.confirm_label.text().replace("&gt;", ">")
    assert (panel.suggestions.chosen == "confirmed") == (c.winner is not None)
    assert run.state == RunState.PAUSED
    for k, v in eng.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in eng.optimizer.state_dict()["state"][0].items():
        assert torch.equal(v, opt_before[k]), k
    tests = [e.data for e in run.events if e.kind == EventKind.RANGE_TEST]
    assert len(tests) == 2 and tests[1]["method"] == "confirmed" and tests[1]["reason"] == c.reason


# ---- the sweep ---------------------------------------------------------------------------------------
def start_sweep(qtbot, host, rates: str, steps: int):
    """Load ``regression`` and press Run sweep with these rates and steps; the panel."""
    host.load("regression")
    panel = host.lab.sweep
    type_into(qtbot, panel.lrs, rates)
    panel.steps.setValue(steps)
    click(qtbot, panel.run_button)
    assert panel.busy(), panel.errors.text()
    return panel


def test_sweep_members_are_runs_one_after_another_and_their_rows_are_lrviz_sweeps(qtbot, host, monkeypatch):
    """Each member starts only once the one before has ended, whatever the ticks: the first trains over
    many of them; the second (lr 3 diverges in a few steps) is forced to end before the tick after the
    one that started it, and the sweep still goes on and finishes.

    (The test once waited to see the second member running: a member that lives less than the time
    between two of the test's looks could start and end unseen on a loaded machine, and the wait ran
    out although the sweep had finished.)"""
    ended_before: list[list[bool]] = []  # at each member's start: whether each run started before had ended
    start_run = host.start_run

    def start_member(spec, *, show=True):
        ended_before.append([r.done.is_set() for r in host.started])
        run = start_run(spec, show=show)
        if len(ended_before) == 2:
            assert run.done.wait(WAIT / 1000)  # ended before the panel's next tick looks at it
        return run

    monkeypatch.setattr(host, "start_run", start_member)
    panel = start_sweep(qtbot, host, "0.01,3", 150)
    first = panel._current.run
    assert first is not None and first is not host.run  # a run of the panel's own, not shown
    qtbot.waitUntil(lambda: not panel.busy(), timeout=WAIT)
    assert ended_before == [[], [True]]  # one after another
    rows = panel.table_rows()
    assert [r[0].lstrip("■ ") for r in rows] == ["0.01", "3"]
    assert rows[0][1] == "finished" and rows[0][7] == "no"
    assert rows[1][1] == "diverged" and rows[1][7] == "yes"
    assert "Diverged: lr 3" in panel.progress_label.text()
    # the numbers are those `lrviz sweep` computes for the same runs
    exp = load_experiment("regression")
    cfg = host.lab.run_config().merged({"steps": 150, "checkpoint_every": None})
    cfg.epochs = None
    expected = run_sweep(exp, cfg.validated(), [0.01, 3.0])
    for got, want in zip(panel.rows, expected, strict=True):
        assert (got.state, got.steps, got.diverged) == (want.state, want.steps, want.diverged)
        assert got.final_loss == pytest.approx(want.final_loss, nan_ok=True)
        assert got.best_loss == pytest.approx(want.best_loss) and got.target_loss == pytest.approx(want.target_loss)
        assert got.steps_to_target == want.steps_to_target
    assert len(host.store.list_runs()) == 2  # saved in the store, named by rate
    assert {r.name for r in host.store.list_runs()} == {"sweep lr=0.01", "sweep lr=3"}
    # every run drawn in its own colour; selecting a row highlights its curve
    assert len({r.curve.opts["pen"].color().name() for r in panel.runs}) == 2
    panel.table.selectRow(1)
    assert panel.runs[1].curve.opts["pen"].widthF() > panel.runs[0].curve.opts["pen"].widthF()


def test_a_member_that_cannot_start_ends_the_sweep_with_its_reason(qtbot, host, monkeypatch):
    """The worker of the second member cannot be started (e.g. too many open files): the sweep ends
    there with the reason shown and the first member's row kept; Run sweep is offered again."""
    start_run = host.start_run
    calls = []

    def start_member(spec, *, show=True):
        calls.append(spec)
        if len(calls) == 2:
            raise OSError(24, "Too many open files")
        return start_run(spec, show=show)

    monkeypatch.setattr(host, "start_run", start_member)
    panel = start_sweep(qtbot, host, "0.01,0.02,0.03", 60)
    qtbot.waitUntil(lambda: not panel.busy(), timeout=WAIT)
    assert len(calls) == 2  # no third member after the failure
    assert "the sweep stopped" in panel.errors.text() and "Too many open files" in panel.errors.text()
    assert [r[1] for r in panel.table_rows()] == ["finished"]
    assert "1 of 3 runs done" in panel.progress_label.text()
    assert panel.run_button.isEnabled() and not panel.stop_button.isEnabled()


def test_sweep_stop_stops_the_member_training_and_starts_no_other(qtbot, host):
    panel = start_sweep(qtbot, host, "0.01,0.02,0.03", 1_000_000)
    member = panel._current.run
    qtbot.waitUntil(lambda: member.step >= 20, timeout=WAIT)
    click(qtbot, panel.stop_button)
    qtbot.waitUntil(lambda: not panel.busy(), timeout=WAIT)
    assert member.state == RunState.STOPPED
    rows = panel.table_rows()
    assert len(rows) == 1 and rows[0][1] == "stopped"
    assert "1 of 3 runs done (stopped)" in panel.progress_label.text()
    assert len(host.store.list_runs()) == 1


# ---- the divergence guard -------------------------------------------------------------------------------
def test_divergence_banner_explains_and_rolls_back_through_the_run(qtbot, host):
    host.load("regression")
    host.overrides.update({"steps": 3000})
    run = host.start()
    assert run.config["divergence"] == "pause" and run.config["checkpoint_every"] == 200  # the lab's options
    qtbot.waitUntil(lambda: run.step >= 230, timeout=WAIT)
    run.set_lr(2.0).result(WAIT / 1000)  # far too high mid-run
    qtbot.waitUntil(lambda: run.state == RunState.PAUSED and run.detection is not None, timeout=WAIT)
    banner = host.lab.banner
    qtbot.waitUntil(banner.isVisible, timeout=WAIT)
    det = run.detection
    assert f"step {det['step']:,}" in banner.title.text()
    assert det["explanation"][:60] in banner.explanation.text().replace("&#x27;", "'")
    assert banner.rollback_button.isEnabled() and banner.resume_button.isVisible()
    banner.resume_after.setChecked(False)
    click(qtbot, banner.rollback_button)
    # the banner may first learn of the roll-back from its event; the status bar says it from the ack
    qtbot.waitUntil(lambda: banner.mode == "rolled_back" and host.statuses[-1].startswith("rolled back"),
                    timeout=WAIT)
    rb = [e for e in run.events if e.kind == EventKind.ROLLBACK][-1]
    saved = torch.load(rb.data["path"], weights_only=True)
    assert rb.data["to_step"] == saved["step"] <= det["step"]
    assert run.lrs[0] == pytest.approx(saved["lrs"][0] / 10) and run.state == RunState.PAUSED
    # the banner (and the status bar) say what the ack says was restored
    restored = f"restored step {saved['step']:,}, lr {fmt(run.lrs[0])}"
    assert restored in banner.title.text() and restored in host.statuses[-1]
    assert host.controls.lr.value() == pytest.approx(run.lrs[0])
    for name, t in run.engine.model.state_dict().items():
        assert torch.equal(t, saved["model"][name]), name
    click(qtbot, banner.resume_button)
    qtbot.waitUntil(lambda: run.step > rb.step + 20, timeout=WAIT)
    assert not banner.resume_button.isVisible()


def test_automatic_rollback_is_reported_from_its_event(qtbot, host):
    host.load("regression")
    host.lab.options.auto_rollback.setChecked(True)
    host.overrides.update({"steps": 3000})
    run = host.start()
    assert run.config["divergence"] == "rollback"
    qtbot.waitUntil(lambda: run.step >= 230, timeout=WAIT)
    run.set_lr(2.0).result(WAIT / 1000)
    banner = host.lab.banner
    qtbot.waitUntil(lambda: banner.mode == "auto", timeout=WAIT)
    rb = next(e for e in run.events if e.kind == EventKind.ROLLBACK)
    assert "Automatic roll-back" in banner.title.text()
    assert f"restored step {rb.data['to_step']:,}" in banner.title.text()


# ---- the 2-D surface -----------------------------------------------------------------------------------
def test_surface_view_draws_the_workers_grid_and_the_runs_path(qtbot, host):
    info = host.load("surface_rosenbrock")
    lab = host.lab
    panel = lab.surface
    host.ticked.emit()
    assert panel.surface is not None and "Rosenbrock" in panel.title.text()
    assert len(panel.minima.data) == 1 and len(panel._isos) > 5
    grid = np.asarray(panel.image.image)  # the worker's samples (log-scaled for this surface)
    assert grid.shape == (len(info.surface()["ys"]), len(info.surface()["xs"]))
    host.overrides["steps"] = 300
    run = host.start()
    wait_done(qtbot, run)
    host.ticked.emit()
    x, y = panel.path_points()
    assert len(x) == 300
    assert x[-1] == pytest.approx(run.probe_values["x"][-1]) and y[-1] == pytest.approx(run.probe_values["y"][-1])
    px, py = panel.point.getData()
    assert (px[0], py[0]) == pytest.approx((x[-1], y[-1]))
    loss = float(run.buffer.view()["loss"][-1])
    assert "step 299" in panel.readout.text() and f"loss {loss:.4g}" in panel.readout.text()
    # a second run in slow motion: the first path stays, faintly; the pace is the run's (600 steps at
    # 200 a second take 3 s: it is still running when the pace changes back)
    host.overrides.update({"momentum": 0.9, "steps": 600})
    panel.set_pace(200.0)
    second = host.start()
    host.ticked.emit()
    assert len(panel.kept) == 1 and panel.kept[0].label == "sgd lr 0.001"
    assert second.config["pace"] == 200.0 and second.engine.control.pace == 200.0
    panel.set_pace(None)  # changes the live run at once
    assert second.engine.control.pace is None
    wait_done(qtbot, second)


def test_surface_view_follows_the_surface_knob(qtbot, host):
    host.load("surface_rosenbrock")
    panel = host.lab.surface
    host.overrides["params"] = {"surface": "himmelblau"}
    host.ticked.emit()
    assert panel.surface is not None and "Himmelblau" in panel.title.text()
    assert len(panel.minima.data) == 4


# ---- diagnostics ----------------------------------------------------------------------------------------
def test_diagnostics_read_the_runs_validation_and_layers(qtbot, host):
    host.load("regression")
    host.overrides["steps"] = 400
    run = host.start()
    wait_done(qtbot, run)
    host.ticked.emit()
    panel = host.lab.diagnostics
    assert panel.report is not None and panel.report.verdict in ("ok", "overfitting", "underfitting")
    assert panel.report.verdict in panel.verdict.text() and len(panel.verdict_text.text()) > 20
    assert len(panel.val_curve.getData()[0]) == len(run.validation)
    layers = run.layers()
    assert "0.weight" in panel.layer_key.text() and len(layers["step"]) >= 10
    ratio, _grad = panel._layer_curves["0.weight"]
    np.testing.assert_allclose(ratio.getData()[1], layers["update_ratio"][:, layers["names"].index("0.weight")])
    # a second run with Adam: the first run's mean ratio stays as a dashed line to compare with
    host.overrides.update({"optimizer": "adam", "lr": 0.003, "steps": 100})
    second = host.start()
    wait_done(qtbot, second)
    for _ in range(6):
        host.ticked.emit()
    assert "previous: sgd m0.9 lr 0.05" in panel.layer_key.text()
    assert panel._previous is not None and len(panel._previous.getData()[0]) >= 10
    # ReduceLROnPlateau in one click: no run live, so it is the schedule of the next start
    click(qtbot, panel.plateau_button)
    assert host.applied[-1].startswith("ReduceLROnPlateau") and host.config().schedule.startswith("ReduceLROnPlateau")


def test_diagnostics_show_a_stored_run_when_no_run_is_shown(qtbot, host, tmp_path):
    host.load("regression")
    host.overrides["steps"] = 300
    run = host.start()
    wait_done(qtbot, run)
    host.show_run(None)
    host.shown_run_id = run.run_id
    host.ticked.emit()
    panel = host.lab.diagnostics
    assert panel.report is not None
    assert len(panel.val_curve.getData()[0]) == len(host.store.load_validation(run.run_id))


# ---- notes ---------------------------------------------------------------------------------------------
def test_teaching_notes_come_from_the_script_info(qtbot, host):
    info = host.load("surface_saddle")
    text = notes_html(info)
    assert "2-D surface: a saddle point" in text and "<li" in text and "What to try" in text
    assert "one of" in text and "rastrigin" in text  # the knob's choices


def test_the_lab_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys\nimport lrviz.ui.lab.panels, lrviz.ui.lab.notes\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "QT_QPA_PLATFORM": "offscreen"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_render_range_test_writes_png_svg_pdf(tmp_path):
    from lrviz.ui.render import render_range_test

    from lrviz.lab.rangetest import find_lr

    exp = load_experiment("regression")
    result = find_lr(exp, RunConfig(**exp.defaults), start=1e-5, steps=60)
    for ext in ("png", "svg", "pdf"):
        out = render_range_test(result, tmp_path / f"rt.{ext}", title="LR range test")
        assert len(out.read_bytes()) > 1000
    assert (tmp_path / "rt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "rt.svg").read_bytes()[:2000]
    assert (tmp_path / "rt.pdf").read_bytes()[:4] == b"%PDF"
