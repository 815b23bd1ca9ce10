"""The LR range test panel: sweep the rate up exponentially, watch the loss, pick a rate in one click.

With a live run (running or paused) the test runs in that run, on its current weights, which are
restored exactly afterwards (``run.range_test``). With nothing running it starts a run of its own
on a fresh model from the script: a child process started paused (``window.start_run(spec,
show=False)``, not stored: it never trains, so it is not listed), tests it, and stops it. Either way
the curve is drawn from ``run.range_test_progress`` as it comes, and the result arrives in the
command's ack; the panel's tick hands both to the widgets on the GUI thread.

Confirmation (:func:`lrviz.lab.rangetest.confirm_rates`) trains a few rates from the suggestion band from
the same weights for a short while and picks the one whose loss fell most: after the test when it
costs less than the test (or always, or never), or on its own with "Confirm" (``run.confirm_lr``, on
the live run or on a fresh model again).
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QWidget,
)

from lrviz.errors import ConfigError, LrvizError
from lrviz.lab.rangecurve import (
    CONFIRM_STEPS,
    METHODS,
    Confirmation,
    RangeTestResult,
    Suggestions,
    adopt,
    candidates,
    loss_axis_range,
    smooth,
)

from .. import theme
from ..widgets import ErrorLabel, ValidatedLineEdit, parse_float_in, parse_int_at_least, row_layout
from .common import LabPanel, fmt, form, is_live, lab_plot, note_label, push_button, scroll_column

if TYPE_CHECKING:
    from lrviz.live.run import Run

    from .panels import Lab

#: How each suggestion method is named on the plot and in the method list.
METHOD_LABELS = {"steepest": "steepest", "valley": "valley", "minimum_tenth": "min / 10", "confirmed": "confirmed"}
METHOD_TIPS = {
    "steepest": "the rate where the smoothed loss falls fastest against log(lr)",
    "valley": "fastai's valley: about half-way along the longest descent of the smoothed loss",
    "minimum_tenth": "a tenth of the rate at the lowest smoothed loss (fastai's minimum)",
    "confirmed": "of a few rates from the band, each trained a short while from the same weights, the one "
                 "whose loss fell most",
}
METHOD_COLOURS = {"steepest": theme.PURPLE, "valley": theme.GREEN, "minimum_tenth": theme.ORANGE,
                  "confirmed": theme.VERMILLION}
#: The entries of the method list: the suggestion methods, then the confirmed rate.
CHOICES = (*METHODS, "confirmed")
#: Confirmation after a range test: (label, the ``confirm`` argument of ``range_test``).
CONFIRM_MODES = (("when cheaper than the test", None), ("always", True), ("never", False))
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


class RangeTestPanel(LabPanel):
    """Settings, Run/Cancel, the live curve with the suggestions, Confirm, and "Use this LR"."""

    def __init__(self, lab: Lab, parent: QWidget | None = None):
        super().__init__(lab, parent)
        self.setObjectName("rangeTestPanel")
        self.result: RangeTestResult | None = None
        self.suggestions: Suggestions | None = None
        #: The run the test (or confirmation) runs in, while it runs.
        self.target: Run | None = None
        #: A run of the panel's own (a fresh model), stopped once the test has ended.
        self.own: Run | None = None
        self._future: Future | None = None
        self._old_points: tuple[Any, int] = (None, 0)  # the run's progress list before this test, its length
        self._drawn = -1
        self._job = ""  # "range test" or "confirmation" while one runs
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
        for m in CHOICES:
            self.method.addItem(METHOD_LABELS[m], m)
            self.method.setItemData(self.method.count() - 1, METHOD_TIPS[m], Qt.ItemDataRole.ToolTipRole)
        self.method.setCurrentIndex(CHOICES.index("valley"))
        self.method.setToolTip("which suggestion is \"the\" one (all are drawn); a confirmation chooses "
                               "its winner")
        self.confirm_mode = QComboBox()
        self.confirm_mode.setObjectName("rtConfirmMode")
        for label, _value in CONFIRM_MODES:
            self.confirm_mode.addItem(label)
        self.confirm_mode.setToolTip("after the test, train a few rates from the band from the same weights "
                                     "for a short while and choose the one whose loss fell most")
        self.confirm_steps = ValidatedLineEdit(parse_int_at_least(2, "confirmation steps"), str(CONFIRM_STEPS),
                                               tooltip="steps each rate trains for when confirming")
        self.confirm_steps.setObjectName("rtConfirmSteps")
        self.errors = ErrorLabel()
        self.errors.watch(self.start, self.end, self.steps, self.stop_factor, self.confirm_steps)

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
        row = QHBoxLayout()
        row.addWidget(self.confirm_mode, 2)
        row.addWidget(self.confirm_steps, 1)
        row.addWidget(QLabel("steps"))
        f.addRow("confirm", row)

        self.run_button = push_button("Run range test", "rtRun",
            "sweep the learning rate up exponentially and watch where the loss falls fastest")
        self.cancel_button = push_button("Cancel", "rtCancel")
        self.confirm_button = push_button("Confirm", "rtConfirm",
            "train a few rates from the suggestion band from the same weights for a short while, and choose"
            " the one whose loss fell most")
        self.use_button = push_button("Use this LR", "rtUse",
            "set the suggested rate (mid-run: from the next step on)")
        buttons = row_layout(self.run_button, self.cancel_button, None)
        after = row_layout(self.confirm_button, None, self.use_button)  # four buttons do not fit a narrow dock

        self.mode_label = note_label(name="rtMode")
        self.plot = lab_plot("learning rate (log scale)", "loss", log_x=True)
        self.plot.setObjectName("rtPlot")
        p = self.plot.getPlotItem()
        self.raw_curve = p.plot(pen=theme.pen(theme.LOSS_RAW, 1.0, alpha=170))
        self.smooth_curve = p.plot(pen=theme.pen(theme.LOSS_SMOOTH, 2.2))
        # the key sits above the plot, where it never covers the suggestion labels
        self.key = note_label(f"<span style='color:{theme.LOSS_RAW}'>&#9644;</span> loss per batch &nbsp; "
                              f"<span style='color:{theme.LOSS_SMOOTH}'>&#9644;</span> smoothed (EMA 0.98) &nbsp; "
                              f"<span style='color:{theme.GREEN}'>&#9646;</span> suggestion band")
        self.suggestion_label = note_label("", theme.FOREGROUND, name="rtSuggestion")
        self.stop_label = note_label(name="rtStopReason")
        self.confirm_label = note_label("", theme.FOREGROUND, name="rtConfirmation")

        col = scroll_column(self)
        col.setContentsMargins(4, 4, 4, 4)
        col.setSpacing(4)
        col.addLayout(f)
        col.addWidget(self.errors)
        col.addLayout(buttons)
        col.addLayout(after)
        col.addWidget(self.mode_label)
        col.addWidget(self.key)
        col.addWidget(self.plot, 1)
        col.addWidget(self.suggestion_label)
        col.addWidget(self.confirm_label)
        col.addWidget(self.stop_label)

        self.run_button.clicked.connect(self._on_run)
        self.cancel_button.clicked.connect(self._on_cancel)
        self.confirm_button.clicked.connect(self._on_confirm)
        self.use_button.clicked.connect(self._on_use)
        self.method.currentIndexChanged.connect(self._on_method_changed)
        self._update_buttons()
        self.update_mode()

    # ---- state ------------------------------------------------------------------------------------
    def busy(self) -> bool:
        """Whether a range test or a confirmation is running."""
        return self._future is not None

    def update_mode(self) -> None:
        """Say where the next test runs: on the live run's weights, or on a fresh model."""
        if self.busy():
            return
        run = self.lab.run
        info = self.lab.script_info
        if is_live(run):
            text = (f"Runs on the live run's current weights at step {run.step:,}, which are restored "
                    "exactly afterwards.")
        elif info is not None:
            text = f"Runs on a fresh model from {Path(info.path).name} (the settings in Controls)."
        else:
            text = "Load a script first."
        if self.mode_label.text() != text:
            self.mode_label.setText(text)
        self._update_buttons()

    def _update_buttons(self) -> None:
        busy = self.busy()
        ready = self.lab.script_info is not None or is_live(self.lab.run)
        self.run_button.setEnabled(not busy and ready)
        self.cancel_button.setEnabled(busy)
        r = self.result
        self.confirm_button.setEnabled(not busy and ready and r is not None and r.suggestions.reason is None)
        s = self.suggestions
        self.use_button.setEnabled(not busy and s is not None and s.best is not None)
        if s is not None and s.best is not None:
            self.use_button.setText(f"Use this LR ({fmt(s.best)})")
        else:
            self.use_button.setText("Use this LR")

    def _settings(self) -> dict[str, Any]:
        bad = [f for f in (self.start, self.end, self.steps, self.stop_factor, self.confirm_steps)
               if not f.is_valid()]
        if bad:
            bad[0].setFocus()
            raise ConfigError(bad[0].error() or "invalid value")
        method = self.method.currentData()
        kw = {"start": self.start.value(), "end": self.end.value(), "steps": self.steps.value(),
              "stop_factor": self.stop_factor.value(), "method": method if method in METHODS else "valley",
              "beta": BETA, "confirm": CONFIRM_MODES[self.confirm_mode.currentIndex()][1],
              "confirm_steps": self.confirm_steps.value()}
        if kw["end"] <= kw["start"]:
            raise ConfigError(f"the end rate ({fmt(kw['end'])}) must be above the start ({fmt(kw['start'])})")
        return kw

    # ---- running ------------------------------------------------------------------------------------
    def run_test(self) -> bool:
        """Start a range test (the Run button); False when refused (the reason is shown)."""
        if self.busy():
            return False
        try:
            kw = self._settings()
        except ConfigError as exc:
            self.errors.show_error(str(exc))
            return False
        self.errors.show_error(None)
        self._clear()
        if not self._launch("range test", lambda run: run.range_test(**kw)):
            return False
        self.stop_label.setText("running…")
        return True

    def confirm_now(self) -> bool:
        """Confirm the suggestions of the test shown (the Confirm button): train the candidate rates
        from the same weights for a short while; False when refused (the reason is shown)."""
        r = self.result
        if self.busy() or r is None or r.suggestions.reason is not None:
            return False
        if not self.confirm_steps.is_valid():
            self.errors.show_error(self.confirm_steps.error() or "invalid confirmation steps")
            return False
        steps = self.confirm_steps.value()
        rates = candidates(r.suggestions)
        if not self._launch("confirmation",
                            lambda run: run.confirm_lr(rates, steps=steps, stop_factor=r.stop_factor)):
            return False
        self.errors.show_error(None)
        self.confirm_label.setText(f"confirming {len(rates)} rates for {steps} steps each…")
        return True

    def _launch(self, job: str, send: Callable[[Run], Future]) -> bool:
        """Run ``job`` ("range test" or "confirmation") in the live run (``send(run)`` returns the
        Future of its ack), or in a run of the panel's own on a fresh model; False (the reason
        shown) when the settings are wrong."""
        run = self.lab.run
        own = None
        if is_live(run):
            text = (f"{'Testing' if job == 'range test' else 'Confirming'} on the live run's weights at step "
                    f"{run.step:,} (training waits; the weights are restored afterwards)…")
        else:
            try:
                cfg = self.lab.run_config()
                # a fresh model, paused before its first step; not stored: it never trains
                spec = self.lab.run_spec(cfg, start_paused=True, store=None, name=f"{job} (fresh model)")
                run = own = self.lab.start_run(spec, show=False)
            except LrvizError as exc:
                self.errors.show_error(f"cannot start: {exc}")
                return False
            verb = "Testing" if job == "range test" else "Confirming on"
            text = f"{verb} a fresh model from {Path(spec['script']).name} ({cfg.optimizer}, seed {cfg.seed})…"
        assert run is not None
        self.target, self.own = run, own
        points = run.range_test_progress
        self._old_points = (points, len(points))
        self._future = send(run)
        self.mode_label.setText(text)
        self._job = job
        self._update_buttons()
        self.lab.wake()
        return True

    def cancel(self) -> None:
        """Stop the running test early (its partial curve and suggestions are kept)."""
        if self._future is None or self.target is None:
            return
        if self.own is not None:
            self.own.stop()  # the test sees the stop, ends with what it has, and the run ends
        else:
            self.target.cancel_range_test()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel, and stop the panel's own run (when the window closes)."""
        self.cancel()
        if self.own is not None:
            self.own.stop()
            self.own.done.wait(timeout)

    def _on_run(self) -> None:
        self.run_test()

    def _on_confirm(self) -> None:
        self.confirm_now()

    def _on_cancel(self) -> None:
        self.cancel()
        self.stop_label.setText("cancelling…")

    # ---- the timer ----------------------------------------------------------------------------------
    def run_changed(self, run: Run | None) -> None:
        self.update_mode()

    def script_changed(self, info: Any) -> None:
        self.update_mode()

    def tick(self, run: Run | None = None) -> None:
        """Draw new points of a running test; take its result when its ack has come."""
        fut = self._future
        if fut is None:
            self.update_mode()
            return
        target = self.target
        assert target is not None
        points = target.range_test_progress
        old, old_n = self._old_points
        if self._job == "range test" and points and (points is not old or old_n == 0):
            pts = list(points)
            lrs = np.array([a for a, _ in pts], dtype=np.float64)
            losses = np.array([b for _, b in pts], dtype=np.float64)
            self._draw_curve(lrs, losses, smooth(losses, BETA))
        if not fut.done():
            return
        self._future = None
        own, self.own, self.target = self.own, None, None
        if own is not None and not own.done.is_set():
            own.stop()  # the fresh model has served its purpose
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled():
            exc = LrvizError("cancelled before it started")
        if exc is not None:
            error = own.error if own is not None and own.error else str(exc)  # why the fresh model failed
            self._failed(error)
            return
        data = fut.result().get("data") or {}
        try:
            if self._job == "confirmation":
                result: RangeTestResult | Confirmation = Confirmation.from_dict(data["confirmation"])
            else:
                result = RangeTestResult.from_dict(data["result"])
        except (KeyError, TypeError, ValueError) as err:
            self._failed(f"the run answered something unexpected ({err!r})")
            return
        self._finished(result)

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
        """The curve up to its lowest point fills the height; the blow-up after it leaves at the top."""
        span = loss_axis_range(losses, smoothed)
        if span is not None:
            self.plot.getPlotItem().setYRange(*span, padding=0)

    def _failed(self, exc: BaseException | str) -> None:
        job, self._job = self._job or "range test", ""
        if job == "range test":
            self.stop_label.setText("")
        else:
            self.confirm_label.setText("")
        self.errors.show_error(f"the {job} failed: {exc}")
        self.lab.status(f"{job} failed: {exc}")
        self.update_mode()

    def _finished(self, result: RangeTestResult | Confirmation) -> None:
        self._job = ""
        if isinstance(result, Confirmation):
            r = self.result
            assert r is not None
            r.confirmation, r.confirm_note = result, ""
            r.suggestions.confirmed = None
            if r.suggestions.chosen == "confirmed":
                r.suggestions.chosen = "valley"
            adopt(r)
            result = r
        self.show_result(result)
        s = self.suggestions
        assert s is not None
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
        confirmed = result.suggestions.confirmed is not None
        self.method.model().item(CHOICES.index("confirmed")).setEnabled(confirmed)
        method = self.method.currentData()
        if confirmed:
            method = "confirmed"
        elif method == "confirmed":
            method = "valley"
        self.method.blockSignals(True)
        self.method.setCurrentIndex(CHOICES.index(method))
        self.method.blockSignals(False)
        self.suggestions = dataclasses.replace(result.suggestions, chosen=method)
        c = result.confirmation
        if c is not None:
            self.confirm_label.setText(f"<b>Confirmation</b> ({len(c.trials)} rates): {html.escape(c.reason)}")
        else:
            self.confirm_label.setText(html.escape(result.confirm_note))
        if result.stop_reason:
            self.stop_label.setText(f"Stopped: {result.stop_reason} ({len(result):,} of {result.steps:,} steps).")
        else:
            self.stop_label.setText(f"Ran all {result.steps:,} steps up to {fmt(result.end)}.")
        self._draw_suggestions()
        self._update_buttons()

    def _clear(self) -> None:
        self._remove_suggestions()
        p = self.plot.getPlotItem()
        self.result = None
        self.suggestions = None
        self._drawn = -1
        self.raw_curve.setData([], [])
        self.smooth_curve.setData([], [])
        self.suggestion_label.setText("")
        self.stop_label.setText("")
        self.confirm_label.setText("")
        p.enableAutoRange()

    def _remove_suggestions(self) -> None:
        p = self.plot.getPlotItem()
        for item in self._items:
            p.removeItem(item)
        self._items = []
        self.lines = {}
        self.band = None

    def _draw_suggestions(self) -> None:
        self._remove_suggestions()
        p = self.plot.getPlotItem()
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
        values: dict[str, float | None] = dict(s.values())
        if s.confirmed is not None and s.confirmed not in values.values():  # a rate between the suggestions
            values["confirmed"] = s.confirmed
        positions = (0.93, 0.8, 0.67, 0.54)
        r = self.result
        span = (math.log10(float(r.lrs[0])), math.log10(float(r.lrs[-1]))) if r is not None and len(r) > 1 else None
        order = sorted((m for m in values if values[m] is not None), key=lambda m: values[m])
        for k, m in enumerate(order):
            v = values[m]
            chosen = m == s.chosen or (s.chosen == "confirmed" and v == s.confirmed)
            colour = CHOSEN_COLOUR if chosen else METHOD_COLOURS[m]
            confirmed_here = s.confirmed is not None and v == s.confirmed and m != "confirmed"
            text = f"{METHOD_LABELS[m]} {fmt(v)}" + (" confirmed" if confirmed_here else "") + (" ✔" if chosen else "")
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
            if confirmed_here:
                self.lines["confirmed"] = line  # the confirmed rate is this suggestion's line
        rows = []
        for m in CHOICES:
            v = s.confirmed if m == "confirmed" else values[m]
            if m == "confirmed" and v is None:
                continue
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
        method = self.method.currentData()
        if method == "confirmed" and self.result.suggestions.confirmed is None:
            return
        self.suggestions = dataclasses.replace(self.result.suggestions, chosen=method)
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
