"""The sweep panel: the same experiment at several learning rates, one after another, overlaid live.

Each rate is a child run (``window.start_run(spec, show=False)``, saved in the app's run store),
started when the one before has ended; the panel's tick reads the running member's
:class:`~lrviz.live.run.Run` and, once it has ended, its row (:func:`lrviz.lab.sweep.outcome`, as
``lrviz sweep`` computes it). The table says how each rate did: final and best losses, the steps it
took to reach a common target loss (the speed of convergence) and whether it diverged. Selecting
rows highlights their curves; Stop stops the member that is training and starts no other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from lrviz.config import RunConfig, parse_finite
from lrviz.decimate import EmaSmoother
from lrviz.errors import LrvizError
from lrviz.lab.sweep import (
    SMOOTH_BETA,
    Outcome,
    SweepRow,
    outcome,
    parse_lrs,
    run_name,
    sweep_config,
    with_target,
)
from lrviz.states import RunState

from .. import theme
from ..widgets import ErrorLabel, ValidatedLineEdit, row_layout
from .common import RUN_COLOURS, LabPanel, fmt, form, lab_plot, note_label, push_button

if TYPE_CHECKING:
    from lrviz.live.run import Run

    from .panels import Lab

COLUMNS = ("lr", "state", "final", "best", "final val", "best val", "to target", "diverged")
COLUMN_TIPS = (
    "the learning rate of the run",
    "how the run ended",
    "final training loss: the loss of the last step",
    "best training loss: the lowest loss of any step",
    "the last validation loss",
    "the lowest validation loss",
    "steps to target: the first step whose smoothed training loss (EMA 0.9) reached the target loss (the speed "
    "of convergence; fewer is faster)",
    "the loss became NaN/inf or exploded and the run was stopped",
)
DIVERGED_BG = "#FBE3D6"


def _parse_target(text: str) -> float:
    return parse_finite(text, "target loss")


@dataclass
class _Member:
    """One rate of the sweep, as drawn: its run while it trains, its numbers once it has ended."""

    index: int
    lr: float
    colour: str
    run: Run | None = None
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    smooth: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rows: int = 0
    smoother: EmaSmoother = field(default_factory=lambda: EmaSmoother(SMOOTH_BETA))
    curve: Any = None
    end_mark: Any = None
    outcome: Outcome | None = None
    row: SweepRow | None = None


class SweepPanel(LabPanel):
    """LR list, steps, target; Run/Stop; the runs overlaid live; the results table."""

    def __init__(self, lab: Lab, parent: QWidget | None = None):
        super().__init__(lab, parent)
        self.setObjectName("sweepPanel")
        self.runs: list[_Member] = []
        self.rows: list[SweepRow] = []
        self.target: float | None = None
        self._config: RunConfig | None = None
        self._target_asked: float | None = None
        self._waiting: list[_Member] = []  # members not started yet, in order
        self._current: _Member | None = None
        self._stopping = False
        self._target_line: pg.InfiniteLine | None = None

        self.lrs = ValidatedLineEdit(parse_lrs, "1e-3:1:4",
                                     tooltip="start:end:count (log-spaced, e.g. 1e-4:1:7) or a list (0.1,0.03,0.01)")
        self.lrs.setObjectName("sweepLrs")
        self.steps = QSpinBox()
        self.steps.setObjectName("sweepSteps")
        self.steps.setRange(1, 10_000_000)
        self.steps.setValue(300)
        self.steps.setGroupSeparatorShown(True)
        self.steps.setToolTip("steps of each run")
        self.target_edit = ValidatedLineEdit(_parse_target, "", allow_empty=True, placeholder="auto (1.1 x best)",
                                             tooltip="the loss each run must reach to count as converged; empty: "
                                                     "1.1 x the best final smoothed loss of the sweep")
        self.target_edit.setObjectName("sweepTarget")
        self.log_y = QCheckBox("log loss")
        self.log_y.setChecked(True)
        self.errors = ErrorLabel()
        self.errors.watch(self.lrs, self.target_edit)
        f = form()
        f.addRow("rates", self.lrs)
        row = QHBoxLayout()
        row.addWidget(self.steps, 2)
        row.addWidget(QLabel("target"))
        row.addWidget(self.target_edit, 3)
        f.addRow("steps each", row)

        self.run_button = push_button("Run sweep", "sweepRun",
            "train the script once per rate, one after another (saved in the run store)")
        self.stop_button = push_button("Stop", "sweepStop")
        self.overlay_button = push_button("Show in main plots", "sweepOverlay",
            "overlay the selected runs in the main plots (none selected: every run that did not diverge)")
        buttons = row_layout(self.run_button, self.stop_button, self.log_y, None, self.overlay_button)
        self.progress_label = note_label(name="sweepProgress")

        self.plot = lab_plot("step", "smoothed training loss", log_y=True)
        self.plot.setObjectName("sweepPlot")
        # no legend: the table's first column says which colour is which rate

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setObjectName("sweepTable")
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        for i, tip in enumerate(COLUMN_TIPS):
            self.table.horizontalHeaderItem(i).setToolTip(tip)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.setAlternatingRowColors(True)
        self.table.setWordWrap(False)
        small = self.table.font()
        small.setPointSizeF(max(7.0, small.pointSizeF() - 1))
        self.table.setFont(small)
        self.table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.table.verticalHeader().setDefaultSectionSize(self.table.fontMetrics().height() + 6)
        header = self.table.horizontalHeader()
        header.setMinimumSectionSize(30)
        header.setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        for c in (0, 1):
            header.setSectionResizeMode(c, QHeaderView.ResizeMode.ResizeToContents)
        self.target_label = note_label(name="sweepTargetLabel")

        col = QVBoxLayout(self)
        col.setContentsMargins(4, 4, 4, 4)
        col.setSpacing(4)
        col.addLayout(f)
        col.addWidget(self.errors)
        col.addLayout(buttons)
        col.addWidget(self.progress_label)
        col.addWidget(self.plot, 3)
        col.addWidget(self.table, 2)
        self.table.setMinimumHeight(header.sizeHint().height() + 5 * (self.table.fontMetrics().height() + 6) + 4)
        col.addWidget(self.target_label)

        self.run_button.clicked.connect(self._on_run)
        self.stop_button.clicked.connect(self._on_stop)
        self.overlay_button.clicked.connect(self._on_overlay)
        self.log_y.toggled.connect(self._on_log_toggled)
        self.table.itemSelectionChanged.connect(self._on_selection_changed)
        self._update_buttons()

    # ---- state -------------------------------------------------------------------------------------
    def busy(self) -> bool:
        return self._current is not None

    def _update_buttons(self) -> None:
        busy = self.busy()
        self.run_button.setEnabled(not busy and self.lab.script_info is not None)
        self.stop_button.setEnabled(busy)
        self.overlay_button.setEnabled(not busy and any(r.row is not None and r.row.run_id is not None
                                                        for r in self.runs))
        for w in (self.lrs, self.steps, self.target_edit):
            w.setEnabled(not busy)

    def script_changed(self, info: Any) -> None:
        if not self.busy():
            self._update_buttons()

    # ---- running ---------------------------------------------------------------------------------
    def run_sweep(self) -> bool:
        """Start the sweep (the Run button); False when refused (the reason is shown)."""
        if self.busy():
            return False
        if self.lab.script_info is None:
            self.errors.show_error("load a script first")
            return False
        try:
            lrs = self.lrs.value()
            target = self.target_edit.value()
            cfg = self.lab.run_config()
            cfg.steps, cfg.epochs = self.steps.value(), None
            cfg.checkpoint_every = None  # a sweep measures rates; nobody forks or rolls these back
            cfg = sweep_config(cfg, lrs[0]).validated()  # a bad setting fails before any run starts
        except LrvizError as exc:
            self.errors.show_error(str(exc))
            return False
        self.errors.show_error(None)
        self._clear()
        self.runs = [_Member(i, lr, RUN_COLOURS[i % len(RUN_COLOURS)]) for i, lr in enumerate(lrs)]
        self._config, self._target_asked, self._stopping = cfg, target, False
        self._waiting = list(self.runs)
        self.progress_label.setText(f"{len(lrs)} runs of {cfg.steps:,} steps: {cfg.optimizer}"
                                    + (f", momentum {fmt(cfg.momentum)}" if cfg.momentum else "")
                                    + f", seed {cfg.seed}")
        self._start_next()
        self._update_buttons()
        return True

    def _start_next(self) -> None:
        """Start the next member, or finish the sweep when none is left (or it was stopped)."""
        self._current = None
        if self._stopping or not self._waiting:
            self._finished()
            return
        member = self._waiting.pop(0)
        assert self._config is not None
        try:
            spec = self.lab.run_spec(sweep_config(self._config, member.lr), name=run_name(member.lr))
            member.run = self.lab.start_run(spec, show=False)
        except (LrvizError, OSError) as exc:  # e.g. no worker process could be started: say so, end here
            self.errors.show_error(f"the sweep stopped: {exc}")
            self._waiting = []
            self._finished()
            return
        self._current = member

    def stop(self) -> None:
        """Stop the sweep: the member training stops (its row says so) and no further one starts."""
        if self._current is None:
            return
        self._stopping = True
        run = self._current.run
        if run is not None and not run.done.is_set():
            run.stop()

    def shutdown(self, timeout: float = 10.0) -> None:
        self.stop()
        cur = self._current
        if cur is not None and cur.run is not None:
            cur.run.done.wait(timeout)

    def _on_run(self) -> None:
        self.run_sweep()

    def _on_stop(self) -> None:
        self.stop()
        self.progress_label.setText("stopping…")

    # ---- the timer ---------------------------------------------------------------------------------
    def tick(self, run: Run | None = None) -> None:
        cur = self._current
        if cur is None or cur.run is None:
            return
        changed = self._fold(cur)
        member_run = cur.run
        if member_run.done.is_set():
            self._member_ended(cur)
            changed = True
        elif member_run.state == RunState.RUNNING or member_run.step:
            self.progress_label.setText(
                f"run {cur.index + 1} of {len(self.runs)}: lr {fmt(cur.lr)} — step {member_run.step:,}"
                + (f" / {member_run.total_steps:,}" if member_run.total_steps else ""))
        if changed:
            self._redraw()

    def _member_ended(self, member: _Member) -> None:
        run = member.run
        assert run is not None
        self._fold(member)
        out = outcome(member.lr, run)
        member.outcome, member.row = out, out.row
        member.steps, member.smooth = out.steps.astype(np.float64), out.smooth  # the row's own numbers
        if self._target_asked is not None:
            with_target([out], self._target_asked)
        self._set_row(member)
        member.run = None  # keep the numbers, not the connection
        if str(run.state) == RunState.FAILED and not run.step and run.error:
            # the script or a setting is wrong: every rate would fail the same way (as `lrviz sweep`)
            self.errors.show_error(f"the sweep stopped: {run.error}")
            self._waiting = []
        self._start_next()

    def _fold(self, member: _Member) -> bool:
        """Take the member's new steps (smoothed incrementally, as drawn live)."""
        buf = member.run.buffer if member.run is not None else None
        if buf is None:
            return False
        n = len(buf)
        if n == member.rows:
            return False
        v = buf.view(member.rows, n)
        member.steps = np.concatenate((member.steps, np.asarray(v["step"], dtype=np.float64)))
        member.smooth = np.concatenate((member.smooth, member.smoother.extend(np.asarray(v["loss"], np.float64))))
        member.rows = n
        return True

    def _finished(self) -> None:
        outcomes = [r.outcome for r in self.runs if r.outcome is not None]
        rows = with_target(outcomes, self._target_asked) if outcomes else []
        self.rows = rows
        for member in self.runs:
            if member.row is not None:
                self._set_row(member)
        self.target = rows[0].target_loss if rows else None
        stopped = " (stopped)" if self._stopping else ""
        ok = [r for r in rows if not r.diverged and r.state != RunState.FAILED]
        fastest = min((r for r in ok if r.steps_to_target is not None), key=lambda r: r.steps_to_target,
                      default=None)
        text = f"{len(rows)} of {len(self.runs)} runs done{stopped}."
        if fastest is not None:
            text += f" Fastest to the target: lr {fmt(fastest.lr)} ({fastest.steps_to_target:,} steps)."
        bad = [r for r in rows if r.diverged]
        if bad:
            text += " Diverged: " + ", ".join(f"lr {fmt(r.lr)}" for r in bad) + "."
        self.progress_label.setText(text)
        self.lab.status(f"sweep: {text}")
        self._draw_target()
        self._redraw()
        self._update_buttons()
        self.lab.refresh_runs()

    # ---- drawing ------------------------------------------------------------------------------------
    def _clear(self) -> None:
        p = self.plot.getPlotItem()
        for run in self.runs:
            for item in (run.curve, run.end_mark):
                if item is not None:
                    p.removeItem(item)
        if self._target_line is not None:
            p.removeItem(self._target_line)
            self._target_line = None
        self.runs = []
        self.rows = []
        self.target = None
        self._waiting = []
        self.table.setRowCount(0)
        self.target_label.setText("")
        p.enableAutoRange()

    def _selected(self) -> set[int]:
        return {i.row() for i in self.table.selectionModel().selectedRows()}

    def _redraw(self) -> None:
        p = self.plot.getPlotItem()
        selected = self._selected()
        log = self.log_y.isChecked()
        starts = [float(r.smooth[np.isfinite(r.smooth)][0]) for r in self.runs if np.isfinite(r.smooth).any()]
        cap = 3.0 * max(starts) if starts and max(starts) > 0 else None
        for run in self.runs:
            if run.curve is None and (run.rows or run.row is not None):
                run.curve = p.plot(name=f"lr {fmt(run.lr)}")
                run.curve.setZValue(2)
            if run.curve is None:
                continue
            y = run.smooth.copy()
            y[~np.isfinite(y)] = np.nan
            if log:
                y[~(y > 0)] = np.nan
            highlighted = not selected or run.index in selected
            width = 3.2 if selected and run.index in selected else 1.8
            run.curve.setPen(theme.pen(run.colour, width, alpha=255 if highlighted else 60))
            run.curve.setZValue(5 if selected and run.index in selected else 2)
            run.curve.setData(run.steps, y, connect="finite")
            diverged = run.row is not None and run.row.diverged
            if diverged and run.rows:
                last = np.flatnonzero(np.isfinite(y))
                if last.size:
                    k = int(last[-1])
                    yk = float(min(y[k], cap)) if cap is not None else float(y[k])
                    if run.end_mark is None:
                        run.end_mark = pg.PlotDataItem(pen=None, symbol="x", symbolSize=15, symbolBrush=theme.VERMILLION,
                                                       symbolPen=pg.mkPen(theme.VERMILLION, width=2.5))
                        run.end_mark.setZValue(6)
                        p.addItem(run.end_mark)
                    run.end_mark.setData([run.steps[k]], [yk])
                    run.end_mark.setToolTip(f"lr {fmt(run.lr)} diverged at step {int(run.steps[k])}")
            if run.end_mark is not None:
                run.end_mark.setOpacity(1.0 if highlighted else 0.3)
        self._fit_y()

    def _fit_y(self) -> None:
        """The runs' whole fall in view; a diverged run's blow-up is cut at 3x the highest starting loss."""
        starts, lows = [], []
        for run in self.runs:
            y = run.smooth[np.isfinite(run.smooth)]
            if self.log_y.isChecked():
                y = y[y > 0]
            if y.size:
                starts.append(float(y[0]))
                lows.append(float(y.min()))
        if not starts:
            return
        lo, hi = min(lows), max(starts)
        log = self.log_y.isChecked()
        if log:
            lo, hi = math.log10(lo), math.log10(hi) + math.log10(3.0)
            pad = 0.05 * max(hi - lo, 0.1)
        else:
            hi = hi * 3.0 if hi > 0 else hi + abs(hi) * 2 + 1
            pad = 0.05 * max(hi - lo, 1e-12)
        self.plot.getPlotItem().setYRange(lo - pad, hi + pad, padding=0)

    def _draw_target(self) -> None:
        t = self.target
        if t is None or not math.isfinite(t):
            self.target_label.setText("")
            return
        log = self.log_y.isChecked()
        if log and t <= 0:
            return
        p = self.plot.getPlotItem()
        if self._target_line is not None:
            p.removeItem(self._target_line)
        self._target_line = pg.InfiniteLine(
            pos=math.log10(t) if log else t, angle=0, movable=False,
            pen=theme.pen(theme.GREY, 1.2, dashed=True), label=f"target {fmt(t)}",
            labelOpts={"position": 0.97, "color": theme.GREY, "anchors": [(1, 1), (1, 1)]})
        p.addItem(self._target_line, ignoreBounds=True)
        self.target_label.setText(f"Target loss {fmt(t, 4)}: steps to target = the first step whose smoothed "
                                  "loss reached it (fewer is faster).")

    def _set_row(self, run: _Member) -> None:
        row = run.row
        if row is None:
            return
        if self.table.rowCount() <= run.index:
            self.table.setRowCount(run.index + 1)
        cells = [fmt(row.lr), str(row.state), fmt(row.final_loss), fmt(row.best_loss),
                 fmt(row.final_val_loss), fmt(row.best_val_loss),
                 "—" if row.steps_to_target is None else f"{row.steps_to_target:,}",
                 "yes" if row.diverged else "no"]
        for c, text in enumerate(cells):
            item = QTableWidgetItem(text)
            item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
                                  if c not in (1, 7) else Qt.AlignmentFlag.AlignCenter)
            if c == 0:
                item.setForeground(QBrush(QColor(run.colour)))
                item.setText(f"■ {text}")
                font = item.font()
                font.setBold(True)
                item.setFont(font)
                if row.run_id is not None:
                    item.setToolTip(f"run #{row.run_id} in the run store")
            if row.diverged:
                item.setBackground(QBrush(QColor(DIVERGED_BG)))
                if c in (1, 7):
                    item.setForeground(QBrush(QColor(theme.VERMILLION)))
                    font = item.font()
                    font.setBold(True)
                    item.setFont(font)
            self.table.setItem(run.index, c, item)

    def _on_selection_changed(self) -> None:
        self._redraw()

    def _on_log_toggled(self, on: bool) -> None:
        self.plot.getPlotItem().setLogMode(y=on)
        self._redraw()
        self._draw_target()

    def _on_overlay(self) -> None:
        selected = self._selected()
        ids = [r.row.run_id for r in self.runs
               if r.row is not None and r.row.run_id is not None
               and (r.index in selected if selected else not r.row.diverged)]
        if ids:
            self.lab.overlay(ids)

    # ---- reading (tests, screenshots) ---------------------------------------------------------------
    def table_rows(self) -> list[list[str]]:
        """The table's text, row by row."""
        out = []
        for r in range(self.table.rowCount()):
            out.append([self.table.item(r, c).text() if self.table.item(r, c) else ""
                        for c in range(self.table.columnCount())])
        return out
