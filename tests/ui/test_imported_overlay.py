"""An imported TensorBoard run in the app (issue 10, item 4): listed in the run browser, overlaid on the
plots beside an lrviz run with the values the log holds, and never watched, steered, resumed or forked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from window_driving import button, click, wait_ended

from lrviz.cli import main
from lrviz.states import RunState

pytest.importorskip("tensorboard")
pytestmark = pytest.mark.slow

#: What a user's loop logged with torch's SummaryWriter: every 5th step, a decaying loss and a cosine LR.
STEPS = list(range(0, 200, 5))
LOSS = [2.0 / (1 + s / 40) + 0.05 * np.sin(s) for s in STEPS]
LR = [0.05 * (1 + np.cos(np.pi * s / 200)) / 2 + 1e-4 for s in STEPS]


def write_tb_log(folder: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(folder)) as w:
        for s, loss, lr in zip(STEPS, LOSS, LR):
            w.add_scalar("train/loss", loss, s)
            w.add_scalar("lr", lr, s)


def test_an_imported_tensorboard_run_overlays_beside_an_lrviz_run_and_is_read_only(
        qtbot, window, make_script, open_script, tmp_path, capsys):
    open_script(make_script("mine.py", steps=40))
    click(qtbot, button(window, window.act_start))
    wait_ended(qtbot, window)
    mine = window.run.run_id
    assert window.run.state == RunState.FINISHED, window.messages

    write_tb_log(tmp_path / "tb" / "theirs")
    assert main(["import", str(tmp_path / "tb"), "--store", str(window.store_path)]) == 0, capsys.readouterr().err
    browser = window.run_browser
    click(qtbot, browser.refresh_button)
    imported = next(r for r in window.store.list_runs() if r.kind == "imported")
    row = browser.model.row_of(imported.id)
    assert row is not None  # listed
    status = browser.model.index(row, 3)
    assert status.data() == "finished · imported"
    assert "read-only" in status.data(3)  # its tooltip says what it can and cannot be

    # Selected alone: not watched, not forked or resumed, each button saying why.
    browser.select_runs([imported.id])
    assert not browser.watch_button.isEnabled() and "read-only" in browser.watch_button.toolTip()
    assert "cannot be watched, steered, resumed or forked" in browser.watch_button.toolTip()
    fork = window.lab.panels["fork"]
    qtbot.waitUntil(lambda: fork.run_id() == imported.id)
    for b in (fork.fork_button, fork.resume_button):
        assert not b.isEnabled() and "read-only" in b.toolTip(), b.text()
    assert "imported from" in fork.info.text()

    # Overlaid beside the lrviz run: its curves are the values the log holds (as TensorBoard keeps them).
    window.plot_bar.smoothing.setValue(0)
    window.plot_bar.apply_smoothing()
    browser.select_runs([mine, imported.id])
    click(qtbot, browser.overlay_button)
    plots = window.plots
    by_id = {o.trace.run_id: o for o in plots.overlays}
    assert set(by_id) == {mine, imported.id}
    plots.refresh(force=True)
    theirs = by_id[imported.id]
    x, y = theirs.curves["loss_smooth"].getOriginalDataset()
    assert x.tolist() == STEPS
    assert y.tolist() == [float(np.float32(v)) for v in LOSS]
    x, y = theirs.curves["lr0"].getOriginalDataset()
    assert x.tolist() == STEPS and y.tolist() == [float(np.float32(v)) for v in LR]
    assert any(imported.name in t for t in plots.legend_texts())
    # the lrviz run keeps its own curve beside it
    x, _ = by_id[mine].curves["loss_smooth"].getOriginalDataset()
    assert x.tolist() == list(range(40))


def test_a_log_written_every_tenth_step_is_drawn_at_its_steps_at_any_zoom():
    from lrviz.ui.stored_runs import LoggedRunTrace

    from lrviz.records import StepBuffer

    steps = np.arange(0, 1_000_000, 10)
    loss = np.linspace(2.0, 0.5, len(steps))
    loss[31_415] = 50.0  # one spike, at step 314,150
    lr = np.full((len(steps), 1), 0.01)
    buf = StepBuffer.from_columns({"step": steps, "loss": loss, "lr": lr, "time": steps / 100.0,
                                   "grad_norm": np.full(len(steps), np.nan, np.float32),
                                   "epoch": np.zeros(len(steps), np.int32)}, first_step=0)
    trace = LoggedRunTrace(buf, steps, smoothing=0.0)
    trace.update()
    assert (trace.first_step, trace.last_step) == (0, 999_990)
    x, y = trace.query("loss", 0, 999_990, 200)  # the whole log on 200 pixels: decimated
    assert len(x) <= 2 * 200 + 4 and x.min() >= 0 and x.max() <= 999_990
    peak = int(np.argmax(y))
    assert y[peak] == 50.0 and abs(x[peak] - 314_150) <= 999_990 / 200  # the spike stays, where it was
    x, y = trace.query("loss", 314_100, 314_200, 500)  # zoomed in: the rows themselves, at their steps
    assert x.tolist() == list(range(314_090, 314_211, 10)) and y[x.tolist().index(314_150)] == 50.0
    assert trace.value_at(314_157)["step"] == 314_150 and trace.value_at(314_157)["loss"] == 50.0
    assert trace.value_at(-1) is None
