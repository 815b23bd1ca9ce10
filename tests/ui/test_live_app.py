"""The app on live runs across real processes: children that hang, die or crash; runs started in a
terminal and watched; a run connected to by address and token; what closing and reopening do;
the app process never importing torch. Each test waits on what the window shows or on the
processes' own events, never on the clock."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from lrviz.ui.main_window import MainWindow
from PySide6.QtWidgets import QMessageBox
from window_driving import (
    CHILD_ENV,
    WAIT_MS,
    acked_step,
    button,
    click,
    type_into,
    wait_answer,
    wait_ended,
    wait_steps,
)

from lrviz.live.connection import find_live, live_runs, pid_alive
from lrviz.states import RunState
from lrviz.store.runs import RunStore

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
ROOT = Path(__file__).resolve().parents[2]


def lrviz_run(*args: str, store: Path) -> subprocess.Popen:
    """``lrviz run ...`` in a terminal of its own (a process the app did not start)."""
    return subprocess.Popen([sys.executable, "-m", "lrviz", "run", *args, "--store", str(store), "--quiet"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)


def wait_live(qtbot, store: Path, proc: subprocess.Popen) -> int:
    """The id of the run once it serves (its connection file is written when its row exists)."""
    found: list[int] = []

    def live() -> bool:
        assert proc.poll() is None, proc.stderr.read()
        if (store / "runs.sqlite").exists():
            found[:] = list(live_runs(store / "runs.sqlite"))
        return bool(found)

    qtbot.waitUntil(live, timeout=WAIT_MS)
    return found[0]


def answer_close(monkeypatch: pytest.MonkeyPatch, choice: str, asked: list[str]) -> None:
    """The close question gets ``choice`` ("Stop" or "Leave running"), as if clicked."""

    def exec_(box: QMessageBox) -> int:
        asked.append(box.text())
        next(b for b in box.buttons() if b.text() == choice).click()
        return 0

    monkeypatch.setattr(QMessageBox, "exec", exec_)


def test_a_script_hung_in_build_data_is_stopped_from_the_window(qtbot, window, open_script):
    open_script(SCRIPTS / "hang_in_data.py")
    click(qtbot, button(window, window.act_start))
    run = window.run
    qtbot.waitUntil(lambda: run.attached.is_set() and run.state == RunState.PREPARING, timeout=WAIT_MS)
    t0 = time.monotonic()
    click(qtbot, button(window, window.act_stop))
    wait_ended(qtbot, window)
    print(f"a script hung in build_data stopped {time.monotonic() - t0:.2f} s after Stop")
    assert run.state == RunState.STOPPED
    assert "terminated" in run.stop_message  # it did not answer: SIGTERM, as the escalation says
    assert run.worker.returncode is not None
    assert window.status.state == RunState.STOPPED and window.act_start.isEnabled()


def test_a_child_killed_or_crashed_shows_failed_with_its_signal_and_the_app_carries_on(
        qtbot, window, open_script, make_script, shown):
    open_script(make_script("long.py", steps=1_000_000))
    click(qtbot, button(window, window.act_start))
    run = window.run
    wait_steps(qtbot, window, 20)
    run.kill()  # kill -9 of the training process while the window watches it
    wait_ended(qtbot, window)
    assert run.state == RunState.FAILED and "SIGKILL" in run.error
    assert window.status.state == RunState.FAILED
    assert shown[-1].windowTitle() == "Training failed" and "SIGKILL" in shown[-1].text()
    assert window.store.get_run(run.run_id).status == "failed"

    open_script(SCRIPTS / "crash_at_step.py")
    click(qtbot, button(window, window.act_start))
    crashed = window.run
    wait_ended(qtbot, window)
    assert crashed.state == RunState.FAILED and "SIGSEGV" in crashed.error
    assert "SIGSEGV" in shown[-1].text()
    assert window.store.get_run(crashed.run_id).status == "failed"

    open_script(make_script("after.py", steps=30))  # the app carries on
    click(qtbot, button(window, window.act_start))
    wait_ended(qtbot, window)
    assert window.run.state == RunState.FINISHED and len(window.run.buffer) == 30


def test_watch_a_terminal_run_from_the_run_browser_and_steer_it(qtbot, window, tmp_path):
    store = Path(window.store_path).parent
    out = tmp_path / "out"
    proc = lrviz_run(str(SCRIPTS / "tiny.py"), "--steps", "3000000", "--lr", "0.05", "--out", str(out),
                     store=store)
    try:
        run_id = wait_live(qtbot, store, proc)
        browser = window.run_browser
        browser.refresh()
        browser.select_runs([run_id])
        row = browser.model.row_of(run_id)
        assert browser.model.index(row, 3).data().endswith("· live")
        assert browser.watch_button.isEnabled()
        qtbot.waitUntil(lambda: (window.store.get_run(run_id).steps or 0) >= 100, timeout=WAIT_MS)
        before = window.store.get_run(run_id).steps  # trained before anyone watched
        click(qtbot, browser.watch_button)
        qtbot.waitUntil(lambda: window.run is not None and window.run.run_id == run_id, timeout=WAIT_MS)
        run = window.run
        assert run not in window.runs.started  # watched, not started here
        # its script in the Script panel, its settings in the controls
        qtbot.waitUntil(lambda: window.script_info is not None and window.script_info.name == "tiny", timeout=WAIT_MS)
        qtbot.waitUntil(lambda: window.controls.length.value() == 3_000_000, timeout=WAIT_MS)
        assert window.controls.lr.value() == 0.05
        wait_steps(qtbot, window, run.step + 50)  # live
        qtbot.waitUntil(lambda: window.plots.primary.trace.rows >= before, timeout=WAIT_MS)
        steps = run.buffer.view()["step"]  # the whole history, from step 0, then live
        assert steps[0] == 0 and (np.diff(steps) == 1).all()
        type_into(qtbot, window.controls.lr.edit, "0.0125", enter=True)
        step = acked_step(wait_answer(qtbot, window, "lr 0.0125 from step"))
        click(qtbot, button(window, window.act_stop))
        wait_ended(qtbot, window)
        assert run.state == RunState.STOPPED
        assert proc.wait(WAIT_MS / 1000) == 0
    finally:
        proc.kill()
    with open(out / "metrics.csv", newline="") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert lrs[step - 1] == 0.05 and lrs[step] == 0.0125


def test_watching_a_run_steered_before_shows_its_settings_as_steered(qtbot, window, tmp_path, capsys):
    """The controls showed the settings the run started with (lr 0.05), not the rate it trains with."""
    from lrviz.cli import main

    store = Path(window.store_path).parent
    proc = lrviz_run(str(SCRIPTS / "tiny.py"), "--steps", "3000000", "--lr", "0.05", store=store)
    try:
        run_id = wait_live(qtbot, store, proc)
        assert main(["steer", str(run_id), "--lr", "0.002", "--momentum", "0.5", "--store", str(store)]) == 0
        assert "accepted" in capsys.readouterr().out
        qtbot.waitUntil(lambda: any(e.kind == "set_hyperparams" for e in window.store.load_events(run_id)),
                        timeout=WAIT_MS)
        window.run_browser.refresh()
        window.run_browser.select_runs([run_id])
        click(qtbot, window.run_browser.watch_button)
        qtbot.waitUntil(lambda: window.script_info is not None and window.script_info.name == "tiny", timeout=WAIT_MS)
        qtbot.waitUntil(lambda: window.controls.length.value() == 3_000_000, timeout=WAIT_MS)
        assert window.controls.lr.value() == 0.002 and window.controls.momentum.text() == "0.5"
        click(qtbot, button(window, window.act_stop))
        wait_ended(qtbot, window)
    finally:
        proc.kill()


def test_watching_a_users_own_loop_never_loads_it_as_an_experiment(qtbot, window, tmp_path, monkeypatch):
    """A tracked run's script is the user's training script: importing it would train again (or fail
    as an experiment, as the own-loop example did with "no build_model()"). Its recorded settings show."""
    store = Path(window.store_path).parent
    proc = subprocess.Popen([sys.executable, "-m", "lrviz.resources.examples.own_loop", "--store", str(store)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    loaded: list[str] = []
    monkeypatch.setattr(window, "load_script", lambda path, *a, **k: loaded.append(str(path)))
    try:
        run_id = wait_live(qtbot, store, proc)
        window.run_browser.refresh()
        window.run_browser.select_runs([run_id])
        click(qtbot, window.run_browser.watch_button)
        qtbot.waitUntil(lambda: window.run is not None and window.run.run_id == run_id, timeout=WAIT_MS)
        run = window.run
        assert run.script_path.endswith("own_loop.py")
        # the loop's SGD(momentum=0.9) and its length, as it recorded them; the rate its cosine has reached
        qtbot.waitUntil(lambda: window.controls.momentum.text() == "0.9", timeout=WAIT_MS)
        assert 0.04 < window.controls.lr.value() <= 0.05 and window.controls.length.value() == run.total_steps
        assert loaded == [] and not window.messages
        wait_steps(qtbot, window, run.step + 50)
        type_into(qtbot, window.controls.lr.edit, "0.01", enter=True)
        wait_answer(qtbot, window, "lr 0.01 from step")
        click(qtbot, button(window, window.act_stop))
        wait_ended(qtbot, window)
        assert proc.wait(WAIT_MS / 1000) == 0
    finally:
        proc.kill()


def test_connect_to_a_run_by_address_and_token(qtbot, window, tmp_path, monkeypatch, shown):
    from lrviz.ui.connect_dialog import ConnectDialog

    store = tmp_path / "elsewhere"  # another store: known only by its address
    proc = lrviz_run(str(SCRIPTS / "tiny.py"), "--steps", "3000000", "--listen", "127.0.0.1:0", store=store)
    try:
        run_id = wait_live(qtbot, store, proc)
        info = find_live(store / "runs.sqlite", run_id)
        where = f"127.0.0.1:{info.port}"
        token = [info.token]

        def exec_(dialog: ConnectDialog) -> int:
            dialog.address.setText(where)
            dialog.token.setText(token[0])
            dialog._on_ok()
            return dialog.result()

        monkeypatch.setattr(ConnectDialog, "exec", exec_)
        token[0] = "f" * 64
        window.act_connect.trigger()  # File > Connect to a run…, a wrong token
        qtbot.waitUntil(lambda: any(t == "Cannot connect to the run" for t, _, _ in window.messages), timeout=WAIT_MS)
        text = next(m for t, m, _ in window.messages if t == "Cannot connect to the run")
        assert f"the run at {where} refused us" in text and "is the token right?" in text
        assert window.run is None and proc.poll() is None  # the run carries on

        token[0] = info.token
        window.act_connect.trigger()
        qtbot.waitUntil(lambda: window.run is not None, timeout=WAIT_MS)
        wait_steps(qtbot, window, window.run.step + 20)
        click(qtbot, button(window, window.act_pause))
        qtbot.waitUntil(lambda: window.run.state == RunState.PAUSED, timeout=WAIT_MS)
        click(qtbot, button(window, window.act_stop))
        wait_ended(qtbot, window)
        assert proc.wait(WAIT_MS / 1000) == 0
    finally:
        proc.kill()


def test_connect_dialog_says_what_is_wrong_with_the_address():
    from lrviz.ui.connect_dialog import ConnectDialog

    dialog = ConnectDialog()
    for text in ("", "localhost", "host:port", "7000"):
        dialog.address.setText(text)
        dialog._on_ok()
        assert "HOST:PORT" in dialog.error.text() and dialog.result() == 0
    dialog.address.setText("127.0.0.1:7000")
    dialog._on_ok()
    assert "token" in dialog.error.text()


def test_closing_asks_about_runs_it_started_and_reopening_watches_the_one_left_running(
        qtbot, tmp_path, make_script, shown, pool, monkeypatch):
    store = str(tmp_path / "store")
    w = MainWindow(store_path=store, pool=pool)
    qtbot.addWidget(w)
    w.show()
    with qtbot.waitSignal(w.scriptLoaded, timeout=WAIT_MS):
        w.load_script(make_script("left.py", steps=1_000_000, delay=0.002))
    w.start()
    run = w.run
    wait_steps(qtbot, w, 5)
    pid = run.worker.pid
    asked: list[str] = []
    answer_close(monkeypatch, "Leave running", asked)
    assert w.close()
    assert asked and "still training" in asked[0]
    assert pid_alive(pid) and not run.done.is_set()  # it trains on, unwatched
    at_close = run.step

    again = MainWindow(store_path=store, pool=pool)
    qtbot.addWidget(again)
    again.show()
    again.runs.reattach()
    qtbot.waitUntil(lambda: again.run is not None and again.run.run_id == run.run_id, timeout=WAIT_MS)
    wait_steps(qtbot, again, at_close + 5)  # its steps continue, seen by the new window
    assert again.run in again.runs.started  # asked about again at the next close
    asked.clear()
    answer_close(monkeypatch, "Stop", asked)
    assert again.close() and asked
    assert again.run.done.is_set() and again.run.state == RunState.STOPPED
    qtbot.waitUntil(lambda: not pid_alive(pid), timeout=WAIT_MS)
    with RunStore(store) as s:
        assert s.get_run(run.run_id).status == "stopped"


def test_closing_stops_a_panel_s_own_run_without_asking(qtbot, window, make_script, open_script, monkeypatch):
    open_script(make_script("hidden.py", steps=1_000_000, delay=0.002))
    run = window.start_run(window.run_spec(), show=False)  # as a lab panel does for a run of its own
    assert window.run is None and run not in window.runs.started
    qtbot.waitUntil(lambda: run.step >= 3, timeout=WAIT_MS)
    asked: list[str] = []
    answer_close(monkeypatch, "Leave running", asked)
    assert window.close()
    assert not asked
    assert run.done.is_set() and run.state == RunState.STOPPED


def test_closing_leaves_a_watched_run_running_without_asking(qtbot, window, tmp_path, monkeypatch):
    store = Path(window.store_path).parent
    proc = lrviz_run(str(SCRIPTS / "tiny.py"), "--steps", "3000000", store=store)
    try:
        run_id = wait_live(qtbot, store, proc)
        window.runs.watch(run_id)
        qtbot.waitUntil(lambda: window.run is not None, timeout=WAIT_MS)
        asked: list[str] = []
        answer_close(monkeypatch, "Stop", asked)
        assert window.close()
        assert not asked
        assert proc.poll() is None and find_live(store / "runs.sqlite", run_id) is not None
    finally:
        proc.kill()


def test_the_one_timer_drives_plots_status_and_whoever_listens(qtbot, window, make_script, open_script):
    from PySide6.QtCore import QTimer

    open_script(make_script("ticks.py", steps=1_000_000, delay=0.001))
    ticks: list[int] = []
    window.ticked.connect(lambda: ticks.append(window.plots.redraws))
    click(qtbot, button(window, window.act_start))
    wait_steps(qtbot, window, 10)
    qtbot.waitUntil(lambda: len(ticks) >= 10 and ticks[-1] > ticks[0], timeout=WAIT_MS)
    # one repeating timer polls, at most 30 times a second (Qt's own status-message expiry is no poll)
    polls = [t for t in window.findChildren(QTimer) if t.isActive() and not t.isSingleShot() and t.interval() < 1000]
    assert polls == [window._timer] and window._timer.interval() >= 33
    click(qtbot, button(window, window.act_stop))
    wait_ended(qtbot, window)
    qtbot.waitUntil(lambda: not window._timer.isActive(), timeout=WAIT_MS)  # idle: it stops


NO_TORCH = r"""
import json, os, sys, time, traceback
importers = []

class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not importers:
            importers.append("".join(traceback.format_stack(limit=14)))
        return None

sys.meta_path.insert(0, Spy())
from lrviz.ui.app import create_app
from lrviz.ui.main_window import MainWindow
from lrviz.live.child import WorkerPool
app = create_app()
w = MainWindow(sys.argv[1], pool=WorkerPool(env=dict(os.environ, OMP_NUM_THREADS="1")))
w.show()
w.load_script(None)  # the default experiment
deadline = time.monotonic() + 120
while w.script_info is None and time.monotonic() < deadline:
    app.processEvents(); time.sleep(0.01)
w.start()
while (w.run is None or w.run.step < 5) and time.monotonic() < deadline:
    app.processEvents(); time.sleep(0.01)
print(json.dumps({"script": w.script_info and w.script_info.name, "steps": w.run and w.run.step,
                  "torch": "torch" in sys.modules, "importer": importers[:1]}))
sys.stdout.flush()
w.shutdown(10)
os._exit(0)
"""


def test_the_app_process_never_imports_torch(tmp_path):
    env = {**CHILD_ENV, "QT_QPA_PLATFORM": "offscreen", "LRVIZ_HOME": str(tmp_path / "home"),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(tmp_path / "store")], capture_output=True,
                          text=True, env=env, timeout=WAIT_MS / 1000, cwd=ROOT)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    assert lines, done.stderr[-3000:]
    seen = json.loads(lines[-1])
    assert seen["script"] == "classification" and seen["steps"] >= 5
    assert not seen["torch"], "torch was imported by:\n" + "".join(seen["importer"])
