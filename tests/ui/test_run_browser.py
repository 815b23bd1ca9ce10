"""Tests of the run browser (lrviz.ui.run_browser): rows, sorting, rename, delete, open and overlay."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from lrviz.ui.run_browser import (
    COL_BEST,
    COL_NAME,
    COL_SCRIPT,
    COL_STATUS,
    COL_STEPS,
    RUN_ID_ROLE,
    RunBrowser,
    format_duration,
    format_loss,
)
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QAbstractItemView, QMessageBox

from lrviz.errors import StoreError
from lrviz.store.runs import RunStore

# Before pytest-qt creates the QApplication: no display needed.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def add_run(store: RunStore, name: str, n: int, status: str = "finished", script: str = "/home/u/exp/mnist.py") -> int:
    run_id = store.create_run(script_path=script, script_hash="h", config={"lr": 0.1}, device="cpu", name=name)
    store.set_status(run_id, "running")
    if n:
        loss = np.linspace(2.0, 0.5, n)
        store.append_steps(run_id, 0, {
            "epoch": np.zeros(n, np.int32), "time": np.arange(n) * 0.01, "loss": loss,
            "grad_norm": np.ones(n, np.float32), "lr": np.full((n, 1), 0.1),
        })
    if status != "running":
        store.set_status(run_id, status)
    return run_id


@pytest.fixture
def store(tmp_path: Path):
    with RunStore(tmp_path / "runs.sqlite") as s:
        yield s


@pytest.fixture
def messages(monkeypatch):
    """Every QMessageBox shown (none blocks); `answer` is what question() returns."""
    shown: list[tuple[str, str]] = []

    class Box:
        answer = QMessageBox.StandardButton.Yes

    def question(parent, title, text, *args, **kwargs):
        shown.append(("question", text))
        return Box.answer

    def record(kind):
        def show(parent, title, text, *args, **kwargs):
            shown.append((kind, text))
            return QMessageBox.StandardButton.Ok
        return show

    monkeypatch.setattr(QMessageBox, "question", staticmethod(question))
    monkeypatch.setattr(QMessageBox, "warning", staticmethod(record("warning")))
    monkeypatch.setattr(QMessageBox, "information", staticmethod(record("information")))
    monkeypatch.setattr(QMessageBox, "critical", staticmethod(record("critical")))
    Box.shown = shown
    return Box


def shown_column(browser: RunBrowser, col: int) -> list[str]:
    proxy = browser.proxy
    return [proxy.index(r, col).data() for r in range(proxy.rowCount())]


def shown_ids(browser: RunBrowser) -> list[int]:
    proxy = browser.proxy
    return [proxy.index(r, 0).data(RUN_ID_ROLE) for r in range(proxy.rowCount())]


def make_browser(qtbot, store) -> RunBrowser:
    browser = RunBrowser(store)
    qtbot.addWidget(browser)
    browser.resize(1000, 400)
    return browser


def test_rows_match_the_store(qtbot, store, messages):
    a = add_run(store, "alpha", 100)
    b = add_run(store, "beta", 250, status="diverged")
    c = add_run(store, "gamma", 0, status="failed")
    browser = make_browser(qtbot, store)
    assert sorted(shown_ids(browser)) == sorted([a, b, c])
    assert set(shown_column(browser, COL_NAME)) == {"alpha", "beta", "gamma"}
    row = shown_ids(browser).index(b)
    proxy = browser.proxy
    assert proxy.index(row, COL_STATUS).data() == "diverged"
    assert proxy.index(row, COL_STEPS).data() == "250"
    assert proxy.index(row, COL_BEST).data() == format_loss(0.5)
    assert proxy.index(row, COL_SCRIPT).data() == "mnist.py"
    assert proxy.index(row, COL_SCRIPT).data(Qt.ItemDataRole.ToolTipRole) == "/home/u/exp/mnist.py"
    assert "3 runs" in browser.count_label.text()
    assert messages.shown == []


def test_refresh_shows_new_runs(qtbot, store, messages):
    browser = make_browser(qtbot, store)
    assert browser.proxy.rowCount() == 0
    run_id = add_run(store, "late", 10)
    browser.refresh()
    assert shown_ids(browser) == [run_id]


def test_default_order_is_newest_first_and_columns_sort(qtbot, store, messages):
    ids = [add_run(store, f"run{i}", n) for i, n in enumerate([30, 10, 20])]
    browser = make_browser(qtbot, store)
    assert shown_ids(browser) == list(reversed(ids))
    browser.view.sortByColumn(COL_STEPS, Qt.SortOrder.AscendingOrder)
    assert shown_column(browser, COL_STEPS) == ["10", "20", "30"]
    browser.view.sortByColumn(COL_STEPS, Qt.SortOrder.DescendingOrder)
    assert shown_column(browser, COL_STEPS) == ["30", "20", "10"]


def test_missing_values_sort_last_both_ways(qtbot, store, messages):
    add_run(store, "empty", 0)
    add_run(store, "some", 10)
    browser = make_browser(qtbot, store)
    for order in (Qt.SortOrder.AscendingOrder, Qt.SortOrder.DescendingOrder):
        browser.view.sortByColumn(COL_BEST, order)
        assert shown_column(browser, COL_NAME)[-1] == "empty"


def test_interrupted_run_is_shown_as_interrupted(qtbot, store, messages, tmp_path):
    ok = add_run(store, "fine", 10)
    crashed = add_run(store, "crashed", 10, status="running")
    # The process that ran it is gone: a pid that exited.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE runs SET pid=? WHERE id=?", (int(dead.stdout), crashed))
    browser = make_browser(qtbot, store)  # refresh() re-checks for dead runs
    row = shown_ids(browser).index(crashed)
    index = browser.proxy.index(row, COL_STATUS)
    assert index.data() == "interrupted"
    assert "ended without finishing" in index.data(Qt.ItemDataRole.ToolTipRole)
    assert index.data(Qt.ItemDataRole.DecorationRole) is not None
    assert index.data(Qt.ItemDataRole.FontRole).bold()
    assert browser.proxy.index(shown_ids(browser).index(ok), COL_STATUS).data() == "finished"


def test_rename_inline_persists(qtbot, store, messages):
    run_id = add_run(store, "old name", 5)
    browser = make_browser(qtbot, store)
    index = browser.proxy.index(0, COL_NAME)
    assert index.flags() & Qt.ItemFlag.ItemIsEditable
    assert browser.proxy.setData(index, "  new name ", Qt.ItemDataRole.EditRole)
    assert store.get_run(run_id).name == "new name"
    assert browser.proxy.index(0, COL_NAME).data() == "new name"
    browser.refresh()
    assert shown_column(browser, COL_NAME) == ["new name"]


def test_rename_button_opens_the_editor(qtbot, store, messages):
    add_run(store, "a", 5)
    browser = make_browser(qtbot, store)
    browser.show()
    qtbot.waitExposed(browser)
    browser.select_runs(shown_ids(browser))
    assert browser.rename_button.isEnabled()
    browser.rename_button.click()
    assert browser.view.state() == QAbstractItemView.State.EditingState
    assert browser.view.currentIndex().column() == COL_NAME


def test_rename_refused_by_the_store_shows_a_message(qtbot, store, messages):
    run_id = add_run(store, "keep", 5)
    browser = make_browser(qtbot, store)
    assert not browser.proxy.setData(browser.proxy.index(0, COL_NAME), "   ", Qt.ItemDataRole.EditRole)
    assert store.get_run(run_id).name == "keep"
    assert messages.shown and messages.shown[0][0] == "warning"
    assert "empty" in messages.shown[0][1]


def test_delete_with_confirmation_removes_the_run(qtbot, store, messages):
    keep = add_run(store, "keep me", 5)
    gone = add_run(store, "delete me", 5)
    browser = make_browser(qtbot, store)
    browser.select_runs([gone])
    browser.delete_button.click()
    kind, text = messages.shown[-1]
    assert kind == "question" and "delete me" in text and "keep me" not in text
    assert shown_ids(browser) == [keep]
    with pytest.raises(StoreError):
        store.get_run(gone)


def test_cancelled_delete_keeps_the_runs(qtbot, store, messages):
    ids = [add_run(store, "one", 5), add_run(store, "two", 5)]
    messages.answer = QMessageBox.StandardButton.Cancel
    browser = make_browser(qtbot, store)
    browser.select_runs(ids)
    browser.delete_button.click()
    kind, text = messages.shown[-1]
    assert kind == "question" and "2 runs" in text and "'one'" in text and "'two'" in text
    assert sorted(shown_ids(browser)) == sorted(ids)
    assert len(store.list_runs()) == 2


def test_running_run_cannot_be_deleted(qtbot, store, messages):
    run_id = add_run(store, "live", 5, status="running")
    browser = make_browser(qtbot, store)
    browser.select_runs([run_id])
    browser.delete_button.click()
    assert messages.shown[-1][0] == "information"
    assert store.get_run(run_id).name == "live"


def test_store_error_on_delete_is_a_message(qtbot, store, messages, monkeypatch):
    run_id = add_run(store, "x", 5)
    browser = make_browser(qtbot, store)

    def broken(_run_id):
        raise StoreError("the run store is locked")

    monkeypatch.setattr(store, "delete_run", broken)
    assert not browser.delete_runs([run_id])
    assert messages.shown[-1][0] == "warning" and "locked" in messages.shown[-1][1]


def test_listing_error_is_a_message(qtbot, store, messages, monkeypatch):
    browser = make_browser(qtbot, store)

    def broken():
        raise StoreError("damaged store")

    monkeypatch.setattr(store, "list_runs", broken)
    browser.refresh()
    assert browser.proxy.rowCount() == 0
    assert "damaged store" in messages.shown[-1][1]


def test_overlay_emits_the_selected_ids(qtbot, store, messages):
    ids = [add_run(store, f"r{i}", 5) for i in range(3)]
    browser = make_browser(qtbot, store)
    browser.select_runs(ids[:1])
    assert not browser.overlay_button.isEnabled()
    browser.select_runs([ids[0], ids[2]])
    assert browser.overlay_button.isEnabled() and not browser.open_button.isEnabled()
    with qtbot.waitSignal(browser.overlayRequested, timeout=1000) as blocker:
        browser.overlay_button.click()
    assert sorted(blocker.args[0]) == sorted([ids[0], ids[2]])
    assert "2 selected" in browser.count_label.text()


def test_open_by_button_and_double_click(qtbot, store, messages):
    a = add_run(store, "a", 5)
    b = add_run(store, "b", 5)
    browser = make_browser(qtbot, store)
    browser.show()
    qtbot.waitExposed(browser)
    browser.select_runs([a])
    with qtbot.waitSignal(browser.openRequested, timeout=1000) as blocker:
        browser.open_button.click()
    assert blocker.args == [a]
    row = shown_ids(browser).index(b)
    rect = browser.view.visualRect(browser.proxy.index(row, COL_STEPS))
    # A real double-click is press, release, double-click (the view opens the pressed index).
    qtbot.mouseClick(browser.view.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    with qtbot.waitSignal(browser.openRequested, timeout=1000) as blocker:
        qtbot.mouseDClick(browser.view.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert blocker.args == [b]


def test_selection_survives_refresh(qtbot, store, messages):
    a = add_run(store, "a", 5)
    add_run(store, "b", 5)
    browser = make_browser(qtbot, store)
    browser.select_runs([a])
    add_run(store, "c", 5)
    browser.refresh()
    assert browser.selected_run_ids() == [a]
    assert browser.view.selectionModel().isRowSelected(shown_ids(browser).index(a))


def test_filter_hides_other_runs(qtbot, store, messages):
    add_run(store, "resnet lr 0.1", 5)
    add_run(store, "mlp", 5, status="diverged")
    browser = make_browser(qtbot, store)
    browser.filter_edit.setText("diverged")
    assert shown_column(browser, COL_NAME) == ["mlp"]
    assert browser.count_label.text().startswith("1 of 2 runs")
    browser.filter_edit.clear()
    assert browser.proxy.rowCount() == 2


def test_formats():
    assert format_loss(None) == "—"
    assert format_loss(0.123456) == "0.1235"
    assert format_duration(None) == "—"
    assert format_duration(4.25) == "4.2 s" or format_duration(4.25) == "4.3 s"
    assert format_duration(185) == "3 min 05 s"
    assert format_duration(2 * 3600 + 7 * 60) == "2 h 07 min"
    assert format_duration(3 * 86400 + 4 * 3600) == "3 d 4 h"


def test_keyboard_open_and_rename(qtbot, store, messages):
    run_id = add_run(store, "before", 5)
    browser = make_browser(qtbot, store)
    browser.show()
    qtbot.waitExposed(browser)
    browser.select_runs([run_id])
    browser.view.setFocus()
    with qtbot.waitSignal(browser.openRequested, timeout=1000) as blocker:
        qtbot.keyClick(browser.view, Qt.Key.Key_Return)
    assert blocker.args == [run_id]
    browser.rename_button.click()
    editor = browser.view.focusWidget()
    assert editor is not browser.view and hasattr(editor, "setText")
    editor.setText("after")
    with qtbot.assertNotEmitted(browser.openRequested):
        qtbot.keyClick(editor, Qt.Key.Key_Return)  # commits the edit; does not open
    qtbot.waitUntil(lambda: store.get_run(run_id).name == "after", timeout=1000)


def test_live_runs_say_so_and_watch_them(qtbot, store, messages):
    from lrviz.live.connection import ConnectionInfo, connection_path, write_connection

    done = add_run(store, "done", 5)
    live = add_run(store, "live", 5, status="running")
    write_connection(connection_path(store.path, live),  # served by a process that is alive: this one
                     ConnectionInfo("unix", "/nowhere.sock", "t" * 64, run_id=live, store=str(store.path)))
    browser = make_browser(qtbot, store)
    browser.show()
    qtbot.waitExposed(browser)
    statuses = dict(zip(shown_ids(browser), shown_column(browser, COL_STATUS)))
    assert statuses == {done: "finished", live: "running · live"}
    row = shown_ids(browser).index(live)
    assert "Served live now" in browser.proxy.index(row, COL_STATUS).data(Qt.ItemDataRole.ToolTipRole)
    browser.select_runs([done])
    assert not browser.watch_button.isEnabled()
    browser.select_runs([live])
    assert browser.watch_button.isEnabled()
    with qtbot.waitSignal(browser.watchRequested, timeout=1000) as blocker:
        browser.watch_button.click()
    assert blocker.args == [live]
    rect = browser.view.visualRect(browser.proxy.index(row, COL_STEPS))
    qtbot.mouseClick(browser.view.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    with qtbot.waitSignal(browser.watchRequested, timeout=1000) as blocker:  # double-click a live run: Watch
        qtbot.mouseDClick(browser.view.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert blocker.args == [live]
