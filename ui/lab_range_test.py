"""The LR range test panel: sweep the rate up exponentially, watch the loss, pick a rate in one click.

With a live run (running or paused) the test runs inside the engine on the run's current weights,
which are restored exactly afterwards (``engine.range_test``). With nothing running it builds a
fresh model from the script (``find_lr``) in a background thread. Either way the curve is drawn
live from the panel's timer; nothing touches a widget off the GUI thread.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from lrviz.errors import ConfigError, LrvizError
from lrviz.rangetest import METHODS, RangeTestProgress, RangeTestResult, Suggestions, smooth

from . import (
    _compat,  # noqa: F401  (must run first: PySide6 6.12 signal refcount defect)
    theme,
)
from .lab_common import TERMINAL, Worker, fmt, form, lab_plot, note_label
from .widgets import ErrorLabel, ValidatedLineEdit, parse_float_in, parse_int_at_least

if TYPE_CHECKING:
    from .lab import Lab

#: How each suggestion method is named on the plot and in the method list.
METHOD_LABELS = {"steepest": "steepest", "valley": "valley", "minimum_tenth": "min / 10"}
METHOD_TIPS = {
    "steepest": "the rate where the smoothed loss falls fastest against log(lr)",
    "valley": "fastai's valley: about half-way along the longest descent of the smoothed loss",
    "minimum_tenth": "a tenth of the rate at the lowest smoothed loss",
}
METHOD_COLOURS = {"steepest": theme.PURPLE, "valley": theme.GREEN, "minimum_tenth": theme.ORANGE}
CHOSEN_COLOUR = theme.VERMILLION
BETA = 0.98


def _parse_positive(what: str):  # noqa: ANN202 - returns a parser
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise ConfigError(f"{what} must be a number like 1e-7, not {text!r}") from None
        if not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{what} must be a number > 0, not {text!r}")
        return v

    return parse


class RangeTestPanel(QWidget):
    """Settings, Run/Cancel, the live curve with the suggestions, and "Use this LR"."""

    def __init__(self, lab: Lab, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("rangeTestPanel")
        self.lab = lab
        self.result: RangeTestResult | None = None
        self.suggestions: Suggestions | None = None
        self._worker: Worker | None = None
        self._progress: RangeTestProgress | None = None
        self._future: Future | None = None
        self._engine: Any = None
        self._engine_list: Any = None  # the engine's progress list before this test (to tell them apart)
        self._drawn = -1
        self._items: list[Any] = []
        self.lines: dict[str, pg.InfiniteLine] = {}
        self.band: pg.LinearRegionItem | None = None

        self.start = ValidatedLineEdit(_parse_positive("start"), "1e-7", tooltip="the first (lowest) rate")
        self.start.setObjectName("rtStart")
        self.end = ValidatedLineEdit(_parse_positive("end"), "10", tooltip="the last (highest) rate")
        self.end.setObjectName("rtEnd")
        self.steps = ValidatedLineEdit(parse_int_at_least(10, "steps"), "100",
                                       tooltip="optimizer steps of the sweep (one batch each)")
        self.steps.setObjectName("rtSteps")
        self.stop_factor = ValidatedLineEdit(parse_float_in(1.01, None, "stop factor"), "4",
                                             tooltip="stop once the smoothed loss exceeds this x its best")
        self.stop_factor.setObjectName("rtStopFactor")
        self.method = QComboBox()
        self.method.setObjectName("rtMethod")
        for m in METHODS:
            self.method.addItem(METHOD_LABELS[m], m)
            self.method.setItemData(self.method.count() - 1, METHOD_TIPS[m], Qt.ItemDataRole.ToolTipRole)
        self.method.setCurrentIndex(METHODS.index("valley"))
        self.method.setToolTip("which suggestion is \"the\" one (all three are drawn)")
        self.errors = ErrorLabel()
        self.errors.watch(self.start, self.end, self.steps, self.stop_factor)

        f = form()
        row = QHBoxLayout()
        row.addWidget(self.start, 1)
        row.addWidget(QLabel("to"))
        row.addWidget(self.end, 1)
        f.addRow("rates", row)
        row = QHBoxLayout()
        row.addWidget(self.steps, 1)
        row.addWidget(QLabel("stop at"))
        row.addWidget(self.stop_factor, 1)
        row.addWidget(QLabel("x best"))
        f.addRow("steps", row)
        f.addRow("suggest by", self.method)

        self.run_button = QPushButton("Run range test")
        self.run_button.setObjectName("rtRun")
        self.run_button.setToolTip("sweep the learning rate up exponentially and watch where the loss falls fastest")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setObjectName("rtCancel")
        self.use_button = QPushButton("Use this LR")
        self.use_button.setObjectName("rtUse")
        self.use_button.setToolTip("set the suggested rate (mid-run: from the next step on)")
        for b in (self.run_button, self.cancel_button, self.use_button):
            b.setAutoDefault(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        buttons.addStretch(1)
        buttons.addWidget(self.use_button)

        self.mode_label = note_label()
        self.mode_label.setObjectName("rtMode")
        self.plot = lab_plot("learning rate (log scale)", "loss", log_x=True)
        self.plot.setObjectName("rtPlot")
        p = self.plot.getPlotItem()
        self.raw_curve = p.plot(pen=theme.pen(theme.LOSS_RAW, 1.0, alpha=170))
        self.smooth_curve = p.plot(pen=theme.pen(theme.LOSS_SMOOTH, 2.2))
        # the key sits above the plot, where it never covers the suggestion labels
        self.key = note_label(f"<span style='color:{theme.LOSS_RAW}'>&#9644;</span> loss per batch &nbsp; "
                              f"<span style='color:{theme.LOSS_SMOOTH}'>&#9644;</span> smoothed (EMA 0.98) &nbsp; "
                              f"<span style='color:{theme.GREEN}'>&#9646;</span> suggestion band")
        self.suggestion_label = note_label("", theme.FOREGROUND)
        self.suggestion_label.setObjectName("rtSuggestion")
        self.stop_label = note_label()
        self.stop_label.setObjectName("rtStopReason")

        col = QVBoxLayout(self)
        col.setContentsMargins(4, 4, 4, 4)
        col.setSpacing(4)
        col.addLayout(f)
        col.addWidget(self.errors)
        col.addLayout(buttons)
        col.addWidget(self.mode_label)
        col.addWidget(self.key)
        col.addWidget(self.plot, 1)
        col.addWidget(self.suggestion_label)
        col.addWidget(self.stop_label)

        self.run_button.clicked.connect(self._on_run)
        self.cancel_button.clicked.connect(self._on_cancel)
        self.use_button.clicked.connect(self._on_use)
        self.method.currentIndexChanged.connect(self._on_method_changed)
        self._update_buttons()
        self.update_mode()

    # ---- state ------------------------------------------------------------------------------------
    def busy(self) -> bool:
        """Whether a range test is running."""
        return self._worker is not None or self._future is not None

    def update_mode(self) -> None:
        """Say where the next test runs: on the live run's weights, or on a fresh model."""
        if self.busy():
            return
        eng = self.lab.engine
        if self.lab.active() and eng is not None:
            self.mode_label.setText(f"Runs on the live run's current weights at step {eng.step:,}, "
                                    "which are restored exactly afterwards.")
        elif self.lab.experiment is not None:
            self.mode_label.setText(f"Runs on a fresh model from {self.lab.experiment.path.name} "
                                    "(the settings in Controls).")
        else:
            self.mode_label.setText("Load a script first.")
        self._update_buttons()

    def _update_buttons(self) -> None:
        busy = self.busy()
        self.run_button.setEnabled(not busy and self.lab.experiment is not None)
        self.cancel_button.setEnabled(busy)
        s = self.suggestions
        self.use_button.setEnabled(not busy and s is not None and s.best is not None)
        if s is not None and s.best is not None:
            self.use_button.setText(f"Use this LR ({fmt(s.best)})")
        else:
            self.use_button.setText("Use this LR")

    def _settings(self) -> dict[str, Any]:
        bad = [f for f in (self.start, self.end, self.steps, self.stop_factor) if not f.is_valid()]
        if bad:
            bad[0].setFocus()
            raise ConfigError(bad[0].error() or "invalid value")
        kw = {"start": self.start.value(), "end": self.end.value(), "steps": self.steps.value(),
              "stop_factor": self.stop_factor.value(), "method": self.method.currentData(), "beta": BETA}
        if kw["end"] <= kw["start"]:
            raise ConfigError(f"the end rate ({fmt(kw['end'])}) must be above the start ({fmt(kw['start'])})")
        return kw

    # ---- running ------------------------------------------------------------------------------------
    def run_test(self) -> bool:
        """Start a range test (the Run button); False when refused (the reason is shown)."""
        if self.busy():
            return False
        exp = self.lab.experiment
        if exp is None:
            self.errors.show_error("load a script first")
            return False
        try:
            kw = self._settings()
        except ConfigError as exc:
            self.errors.show_error(str(exc))
            return False
        self.errors.show_error(None)
        self._clear()
        eng = self.lab.engine
        if self.lab.active() and eng is not None and eng.state in ("running", "paused", "preparing"):
            self._engine = eng
            self._engine_list = eng.range_test_progress
            self._future = eng.range_test(**kw)
            self.mode_label.setText(f"Testing on the live run's weights at step {eng.step:,} "
                                    "(training waits; the weights are restored afterwards)…")
        else:
            try:
                cfg = self.lab.run_config()
            except LrvizError as exc:
                self.errors.show_error(f"cannot start: {exc}")
                return False
            from lrviz.rangetest import find_lr

            progress = RangeTestProgress(kw["steps"], BETA)
            self._progress = progress

            def work(should_stop: Any) -> RangeTestResult:
                return find_lr(exp, cfg, on_step=progress.record, should_stop=should_stop, **kw)

            self._worker = Worker("lrviz-rangetest", work)
            self._worker.start()
            self.mode_label.setText(f"Testing a fresh model from {exp.path.name} ({cfg.optimizer}, "
                                    f"seed {cfg.seed})…")
        self.stop_label.setText("running…")
        self._update_buttons()
        self.lab.wake()
        return True

    def cancel(self) -> None:
        """Stop the running test early (its partial curve and suggestions are kept)."""
        if self._worker is not None:
            self._worker.cancel()
        if self._future is not None:
            if not self._future.cancel() and self._engine is not None:
                self._engine.cancel_range_test()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel and wait for the background thread (when the window closes)."""
        self.cancel()
        if self._worker is not None:
            self._worker.join(timeout)

    def _on_run(self) -> None:
        self.run_test()

    def _on_cancel(self) -> None:
        self.cancel()
        self.stop_label.setText("cancelling…")

    # ---- the timer ----------------------------------------------------------------------------------
    def tick(self) -> None:
        """Draw new points of a running test; take its result when it has ended."""
        if self._worker is not None:
            assert self._progress is not None
            v = self._progress.view()
            self._draw_curve(v["lr"], v["loss"], v["smoothed"])
            if self._worker.done:
                worker, self._worker = self._worker, None
                worker.join()
                if worker.error is not None:
                    self._failed(worker.error)
                else:
                    self._finished(worker.result)
        elif self._future is not None:
            fut = self._future
            eng = self._engine
            data = eng.range_test_progress if eng is not None else []
            if data is not self._engine_list and data:
                pts = list(data)
                lrs = np.array([a for a, _ in pts], dtype=np.float64)
                losses = np.array([b for _, b in pts], dtype=np.float64)
                self._draw_curve(lrs, losses, smooth(losses, BETA))
            if fut.done():
                self._future = None
                self._engine = None
                if fut.cancelled():
                    self.stop_label.setText("cancelled before it started")
                    self._update_buttons()
                elif fut.exception() is not None:
                    self._failed(fut.exception())
                else:
                    self._finished(fut.result())
            elif eng is not None and eng.state in TERMINAL and not eng.is_alive:
                fut.cancel()
                self._future = None
                self._engine = None
                self.stop_label.setText("the run ended before the test could run")
                self._update_buttons()
        else:
            self.update_mode()

    def _draw_curve(self, lrs: np.ndarray, losses: np.ndarray, smoothed: np.ndarray) -> None:
        n = len(lrs)
        if n == self._drawn:
            return
        self._drawn = n
        good = np.isfinite(losses)
        self.raw_curve.setData(lrs[good], losses[good])
        sgood = np.isfinite(smoothed)
        self.smooth_curve.setData(lrs[sgood], smoothed[sgood])
        self._fit_y(losses, smoothed)

    def _fit_y(self, losses: np.ndarray, smoothed: np.ndarray) -> None:
        """Show the whole fall of the loss; the blow-up at the end is cut a little above the stop threshold."""
        sm = smoothed[np.isfinite(smoothed)]
        raw = losses[np.isfinite(losses)]
        if not sm.size or not raw.size:
            return
        try:
            factor = float(self.stop_factor.value())
        except ConfigError:
            factor = 4.0
        best = float(sm.min())
        cap = best + (factor - 1.0) * abs(best) * 1.15
        hi = max(float(sm[0]), min(float(sm.max()), cap), float(np.quantile(raw, 0.5)))
        lo = min(best, float(raw.min()))
        if hi <= lo:
            hi = lo + 1.0
        pad = 0.06 * (hi - lo)
        self.plot.getPlotItem().setYRange(lo - pad, hi + pad, padding=0)

    def _failed(self, exc: BaseException) -> None:
        self.stop_label.setText("")
        self.errors.show_error(f"the range test failed: {exc}")
        self.lab.status(f"range test failed: {exc}")
        self.update_mode()

    def _finished(self, result: RangeTestResult) -> None:
        self.show_result(result)
        s = result.suggestions
        if s.best is not None:
            self.lab.status(f"range test: suggested learning rate {fmt(s.best)} ({METHOD_LABELS[s.chosen]})")
        else:
            self.lab.status(f"range test: no suggestion: {s.reason}")
        self.update_mode()

    # ---- the result --------------------------------------------------------------------------------
    def show_result(self, result: RangeTestResult) -> None:
        """Draw a finished test: its curve, the suggestion band, a labelled line per method."""
        self.result = result
        self._drawn = -1
        self._draw_curve(result.lrs, result.losses, result.smoothed)
        method = self.method.currentData()
        self.suggestions = dataclasses.replace(result.suggestions, chosen=method)
        if result.stop_reason:
            self.stop_label.setText(f"Stopped: {result.stop_reason} ({len(result):,} of {result.steps:,} steps).")
        else:
            self.stop_label.setText(f"Ran all {result.steps:,} steps up to {fmt(result.end)}.")
        self._draw_suggestions()
        self._update_buttons()

    def _clear(self) -> None:
        p = self.plot.getPlotItem()
        for item in self._items:
            p.removeItem(item)
        self._items = []
        self.lines = {}
        self.band = None
        self.result = None
        self.suggestions = None
        self._drawn = -1
        self.raw_curve.setData([], [])
        self.smooth_curve.setData([], [])
        self.suggestion_label.setText("")
        self.stop_label.setText("")
        p.enableAutoRange()

    def _draw_suggestions(self) -> None:
        p = self.plot.getPlotItem()
        for item in self._items:
            p.removeItem(item)
        self._items = []
        self.lines = {}
        self.band = None
        s = self.suggestions
        if s is None:
            return
        band = s.band()
        if band is None or s.best is None:
            self.suggestion_label.setText(f"<b style='color:{theme.VERMILLION}'>no suggestion:</b> "
                                          f"{s.reason or 'the curve cannot be judged'}")
            return
        lo, hi = band
        region = pg.LinearRegionItem(values=(math.log10(lo), math.log10(hi)), movable=False,
                                     brush=pg.mkBrush(theme.colour(theme.GREEN, 45)),
                                     pen=pg.mkPen(theme.colour(theme.GREEN, 120)))
        region.setZValue(-10)
        region.setToolTip(f"the suggestions span {fmt(lo)} to {fmt(hi)}")
        p.addItem(region, ignoreBounds=True)
        self._items.append(region)
        self.band = region
        values = s.values()
        positions = (0.93, 0.8, 0.67)
        r = self.result
        span = (math.log10(float(r.lrs[0])), math.log10(float(r.lrs[-1]))) if r is not None and len(r) > 1 else None
        order = sorted((m for m in METHODS if values[m] is not None), key=lambda m: values[m])
        for k, m in enumerate(order):
            v = values[m]
            chosen = m == s.chosen
            colour = CHOSEN_COLOUR if chosen else METHOD_COLOURS[m]
            text = f"{METHOD_LABELS[m]} {fmt(v)}" + (" ✔" if chosen else "")
            right = span is not None and span[1] > span[0] and (math.log10(v) - span[0]) / (span[1] - span[0]) > 0.55
            anchor = (1.04, 0.5) if right else (-0.04, 0.5)  # keep the label inside the plot
            line = pg.InfiniteLine(
                pos=math.log10(v), angle=90, movable=False,
                pen=theme.pen(colour, 3.0 if chosen else 1.4, dashed=not chosen),
                label=text,
                labelOpts={"position": positions[k % len(positions)], "color": colour,
                           "fill": pg.mkBrush(255, 255, 255, 225), "anchors": [anchor, anchor]},
            )
            line.setZValue(10 if chosen else 5)
            line.label.setToolTip(METHOD_TIPS[m])
            p.addItem(line, ignoreBounds=True)
            self._items.append(line)
            self.lines[m] = line
        rows = []
        for m in METHODS:
            v = values[m]
            colour = CHOSEN_COLOUR if m == s.chosen else METHOD_COLOURS[m]
            mark = "<b>" if m == s.chosen else ""
            unmark = "</b>" if m == s.chosen else ""
            rows.append(f"<span style='color:{colour}'>&#9632;</span>&nbsp;{mark}{METHOD_LABELS[m]} "
                        f"{fmt(v) if v is not None else '—'}{unmark}")
        self.suggestion_label.setText(
            f"<b>Suggested learning rate: <span style='color:{CHOSEN_COLOUR}'>{fmt(s.best)}</span></b> "
            f"({METHOD_LABELS[s.chosen]}); band {fmt(lo)} – {fmt(hi)}<br>" + " &nbsp; ".join(rows))

    def _on_method_changed(self, _index: int) -> None:
        if self.result is None:
            return
        self.suggestions = dataclasses.replace(self.result.suggestions, chosen=self.method.currentData())
        self._draw_suggestions()
        self._update_buttons()

    def chosen_lr(self) -> float | None:
        """The highlighted suggestion (None when there is none)."""
        return self.suggestions.best if self.suggestions is not None else None

    def _on_use(self) -> None:
        lr = self.chosen_lr()
        if lr is None:
            return
        lr = float(f"{lr:.3g}")
        self.lab.use_lr(lr)
