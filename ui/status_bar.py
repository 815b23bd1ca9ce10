"""The status bar: the shown run's state, step, speed, ETA, rate and loss, a progress bar, and messages."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QMainWindow, QProgressBar

from lrviz.states import RunState

from . import theme
from .widgets import format_number

#: The figures are rewritten at most this often (seconds); a change of state shows at once.
STATUS_EVERY_S = 0.25
STATE_COLOURS = {
    RunState.IDLE: theme.GREY, RunState.PREPARING: theme.ORANGE, RunState.RUNNING: theme.GREEN,
    RunState.PAUSED: theme.BLUE, RunState.FINISHED: theme.BLACK, RunState.STOPPED: theme.GREY,
    RunState.DIVERGED: theme.VERMILLION, RunState.FAILED: theme.VERMILLION, RunState.INTERRUPTED: theme.ORANGE,
    "viewing": theme.PURPLE, "loading": theme.ORANGE, "starting": theme.ORANGE, "disconnected": theme.ORANGE,
}


def format_duration(seconds: float) -> str:
    """``1:05`` or ``2:01:05``."""
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def steps_per_second(run: Any) -> float | None:
    """The run's speed over its last two seconds of steps (None unless it is running)."""
    buf = run.buffer
    if buf is None or len(buf) < 2 or run.state != RunState.RUNNING:
        return None
    n = len(buf)
    t = buf.view(max(0, n - 20000), n)["time"]
    i = int(np.searchsorted(t, t[-1] - 2.0))
    dt = float(t[-1] - t[i])
    return (len(t) - 1 - i) / dt if dt > 0 else None


class RunStatusBar:
    """The window's status bar, filled from a :class:`lrviz.live.run.Run` (or a stored run's info)."""

    def __init__(self, window: QMainWindow):
        self.bar = window.statusBar()
        self.state_label = QLabel("idle")
        self.state_label.setObjectName("stateLabel")
        self.step_label = QLabel("")
        self.rate_label = QLabel("")
        self.eta_label = QLabel("")
        self.lr_label = QLabel("")
        self.loss_label = QLabel("")
        self.progress = QProgressBar()
        self.progress.setObjectName("progress")
        self.progress.setFixedWidth(150)
        self.progress.setTextVisible(True)
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        for w in (self.state_label, *self._figures()):
            w.setContentsMargins(6, 0, 6, 0)
            self.bar.addPermanentWidget(w)
        self.bar.addPermanentWidget(self.progress)
        self.state = ""
        self._at = 0.0
        self._window = window
        self.set_state(RunState.IDLE)

    def _figures(self) -> tuple[QLabel, ...]:
        return self.step_label, self.rate_label, self.eta_label, self.lr_label, self.loss_label

    def message(self, text: str, ms: int = 6000) -> None:
        self.bar.showMessage(text, ms)

    def set_state(self, state: str) -> None:
        self.state = str(state)
        colour = STATE_COLOURS.get(state, theme.BLACK)
        self.state_label.setText(f"<b style='color:{colour}'>{state}</b>")

    def busy(self, on: bool, text: str = "", state_after: str = RunState.IDLE) -> None:
        """A busy indicator (loading a script) with ``text``; off: back to ``state_after``."""
        if on:
            self._window.setCursor(Qt.CursorShape.BusyCursor)
            self.progress.setRange(0, 0)
            self.set_state("loading")
            self.message(text, 0)
        else:
            self._window.unsetCursor()
            self.progress.setRange(0, 100)
            self.bar.clearMessage()
            self.set_state(state_after)

    def clear(self) -> None:
        for w in self._figures():
            w.setText("")
        self.progress.setValue(0)
        self.progress.setFormat("")

    def show_stored(self, steps: int, final_loss: float | None, what: str = "steps") -> None:
        """A stored run (or several overlaid) is shown: its size and final loss."""
        self.set_state("viewing")
        self.clear()
        self.step_label.setText(f"{steps:,} {what}")
        if final_loss is not None:
            self.loss_label.setText(f"final loss {format_number(final_loss, 4)}")

    def update(self, run: Any, force: bool = False) -> bool:
        """Show ``run``'s figures (at most every STATUS_EVERY_S, unless its state changed); True when
        its state changed."""
        now = time.monotonic()
        state = str(run.state)
        changed = state != self.state
        if not (force or changed or now - self._at >= STATUS_EVERY_S):
            return False
        self._at = now
        if changed:
            self.set_state(state)
        step, total = run.step, run.total_steps
        self.step_label.setText(f"step {step:,}" + (f" / {total:,}" if total else ""))
        rate = steps_per_second(run)
        self.rate_label.setText(f"{rate:,.0f} steps/s" if rate else "")
        if total and rate and state == RunState.RUNNING:
            self.eta_label.setText(f"ETA {format_duration(max(0, total - step) / rate)}")
        else:
            self.eta_label.setText("")
        if run.lrs:
            self.lr_label.setText("lr " + ", ".join(format_number(x) for x in run.lrs[:3]))
        buf = run.buffer
        if buf is not None and len(buf):
            n = len(buf)
            last = buf.view(n - 1, n)
            # the epoch of the last step taken (the run's counter moves past the last epoch at the end)
            epoch = f"epoch {int(last['epoch'][0]) + 1}"
            epochs = (run.config or {}).get("epochs")
            if epochs:
                epoch += f" of {int(epochs):,}"
            self.loss_label.setText(f"loss {format_number(float(last['loss'][0]), 4)} · {epoch}")
        if total:
            done = min(step, total) / total
            self.progress.setValue(int(100 * done))
            self.progress.setFormat(f"{100 * done:.0f}%")
        return changed
