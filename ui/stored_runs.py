"""Stored runs in the plots: open one (shown alone), overlay several (each in its own colour)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from PySide6.QtWidgets import QMessageBox

from lrviz.errors import LrvizError
from lrviz.records import StepBuffer

from .export_actions import detail_of
from .trace import RunTrace
from .widgets import format_number

if TYPE_CHECKING:
    from .main_window import MainWindow


def run_label(info: Any) -> str:
    """``name (lr 0.01, StepLR)``: a stored run as the legend names it."""
    name = str(info.name or "")
    cfg = info.config or {}
    lr = cfg.get("lr")
    extra = []
    if lr is not None:
        extra.append(f"lr {format_number(float(lr))}")
    if cfg.get("schedule"):
        extra.append(str(cfg["schedule"]).split(":")[0])
    stem = name.split(" #")[0] if " #" in name else name
    return f"{stem} ({', '.join(extra)})" if extra else stem


class LoggedRunTrace(RunTrace):
    """A stored run whose rows are not one a step: an imported log holds the steps it was written at
    (every 10th, say). Drawn at those steps; the crosshair reads the last row at or before a step."""

    def __init__(self, buffer: StepBuffer, steps: np.ndarray, **kwargs: Any):
        super().__init__(buffer, **kwargs)
        self.steps = np.asarray(steps, np.float64)

    @property
    def last_step(self) -> int:
        return int(self.steps[self.rows - 1]) if self.rows else self.first_step - 1

    def query(self, name: str, x0: float, x1: float, width: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.rows:
            return np.empty(0), np.empty(0)
        steps = self.steps[:self.rows]
        # rows in view and one either side, so that the line runs on to the edges
        a = max(0, int(np.searchsorted(steps, x0, side="left")) - 1)
        b = int(np.searchsorted(steps, x1, side="right")) + 1
        rows, y = super().query(name, self.first_step + a, self.first_step + b - 1, width)
        # positions come back as rows (a decimated block at its centre): on to the steps they were logged at
        return np.interp(rows - self.first_step, np.arange(len(steps)), steps), y

    def value_at(self, step: int) -> dict[str, Any] | None:
        row = int(np.searchsorted(self.steps[:self.rows], step, side="right")) - 1
        if row < 0:
            return None
        v = super().value_at(self.first_step + row)
        if v is not None:
            v["step"] = int(self.steps[row])
        return v


class StoredRuns:
    """Draws runs of the window's store: one opened alone, or several overlaid."""

    def __init__(self, window: MainWindow):
        self.window = window
        #: The ids of the runs overlaid now.
        self.overlay_ids: list[int] = []

    def trace(self, run_id: int) -> RunTrace:
        store = self.window.store
        assert store is not None
        info = store.get_run(run_id)
        steps = store.load_steps(info.id)
        at = np.asarray(steps.get("step", ()))
        first = int(at[0]) if len(at) else 0
        buf = StepBuffer.from_columns(steps, first_step=first)
        kwargs: dict[str, Any] = {"label": f"#{info.id} {run_label(info)}", "run_id": info.id,
                                  "smoothing": self.window.plots.smoothing}
        if len(at) and int(at[-1]) - first != len(at) - 1:  # not one row a step (an imported log)
            return LoggedRunTrace(buf, at, events=store.load_events(info.id),
                                  validation=store.load_validation(info.id), **kwargs)
        return RunTrace(buf, store.load_events(info.id), store.load_validation(info.id), **kwargs)

    def open(self, run_id: int) -> None:
        """Show a stored run in the plots (overlaid instead while a run is live)."""
        w = self.window
        if w.store is None:
            return
        if w.is_active():
            self.overlay([*self.overlay_ids, int(run_id)])
            w.show_status(f"run #{run_id} overlaid (a run is in progress)")
            return
        try:
            trace = self.trace(int(run_id))
            info = w.store.get_run(int(run_id))
        except LrvizError as exc:
            w.show_message(QMessageBox.Icon.Warning, "Cannot open the run", str(exc), detail_of(exc))
            return
        w.runs.forget()
        self.overlay_ids = []
        w.plots.set_overlays([])  # an opened run is shown alone
        w.plots.set_primary(trace)
        w.plots.set_hint("")
        w.plots.refresh(force=True)
        w.view_label.setText(f"viewing run #{info.id} {info.name} ({info.status})")
        w.status.show_stored(info.steps, info.final_loss)
        w.update_actions()

    def overlay(self, run_ids: list[int]) -> None:
        """Draw stored runs together, each in its own colour with a legend entry.

        While a run is live it stays drawn and the runs are overlaid on it; otherwise exactly the
        given runs are shown (an empty list removes the overlays).
        """
        w = self.window
        if w.store is None:
            return
        live = w.is_active()
        plots = w.plots
        if not live and run_ids and plots.primary is not None:
            w.runs.forget()
            plots.set_primary(None)
        primary_id = plots.primary.trace.run_id if plots.primary is not None else None
        traces = []
        ids: list[int] = []
        for rid in run_ids:
            rid = int(rid)
            if rid == primary_id or rid in ids:
                continue
            try:
                traces.append(self.trace(rid))
                ids.append(rid)
            except LrvizError as exc:
                w.show_status(f"cannot overlay run #{rid}: {exc}")
        self.overlay_ids = ids
        plots.set_overlays(traces)
        plots.refresh(force=True)
        if ids:
            runs = ", ".join(f"#{i}" for i in ids)  # short first: the legend names each run
            w.view_label.setText(f"+{len(ids)} overlaid ({runs})" if live else f"{len(ids)} runs ({runs})")
            if not live:
                w.status.show_stored(len(ids), None, "runs")
        else:
            w.view_label.setText("")
        w.update_actions()

    def clear(self) -> None:
        """Nothing shown: no overlays, no primary run (another script was opened)."""
        w = self.window
        self.overlay_ids = []
        w.plots.set_overlays([])
        w.plots.set_primary(None)
        w.view_label.setText("")
        w.view_label.setToolTip("")
