"""Driving the main window as a person would, and waiting on what it shows (never on the clock: the
WAIT_MS ceilings only end a broken test)."""

from __future__ import annotations

import os

from PySide6.QtCore import Qt

#: The environment of the training processes tests start: one thread each (the machine is shared).
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
#: Ceiling for a child run to do what a test waits for (ms); only a broken test ever reaches it.
WAIT_MS = 120_000


def click(qtbot, widget) -> None:
    qtbot.mouseClick(widget, Qt.MouseButton.LeftButton)


def button(window, action) -> object:
    """The toolbar button of ``action``."""
    return window.toolbar.widgetForAction(action)


def type_into(qtbot, field, text: str, enter: bool = False) -> None:
    field.setFocus()
    field.selectAll()
    qtbot.keyClick(field, Qt.Key.Key_Backspace)
    qtbot.keyClicks(field, text)
    if enter:
        qtbot.keyClick(field, Qt.Key.Key_Return)


def wait_ended(qtbot, window, timeout: int = WAIT_MS) -> None:
    """Until the shown run has ended and the window has handled its end."""
    qtbot.waitUntil(lambda: window.run is not None and not window.is_active(), timeout=timeout)


def wait_steps(qtbot, window, n: int, timeout: int = WAIT_MS) -> None:
    """Until the shown run has taken ``n`` steps (as the window sees them)."""
    qtbot.waitUntil(lambda: window.run is not None and window.run.step >= n, timeout=timeout)


def wait_answer(qtbot, window, start: str, timeout: int = WAIT_MS) -> str:
    """The first answer to a command that starts with ``start`` ("lr 0.02 from step 12"), once shown."""
    found: list[str] = []

    def seen() -> bool:
        found[:] = [a for a in window.runs.answers if a.startswith(start)]
        return bool(found)

    qtbot.waitUntil(seen, timeout=timeout)
    return found[0]


def acked_step(answer: str) -> int:
    """The step an answer names: ``lr 0.02 from step 1,234`` -> 1234."""
    return int(answer.rsplit("step ", 1)[1].split()[0].replace(",", "").rstrip(")"))
