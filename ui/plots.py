"""The live plots: training and validation loss, learning rates, gradient norm, validation accuracy.

One :class:`TrainingPlots` widget draws a primary run (the live one, or one opened from the store)
and any number of overlaid runs. It never reacts to training steps: the main window's timer calls
:meth:`TrainingPlots.refresh`, which folds in the new rows (see :mod:`lrviz.ui.trace`) and redraws
only when something changed, drawing at most ~2 points per pixel column of each series for the
visible step range (min/max per column, so a one-step spike stays visible at any zoom).

Why ~680 lines in one module: the layout, the traces' plot items, the frame (ranges, follow, redraw
budget), the event markers and the crosshair readout all work on the same plot items and view
ranges of one widget; the pieces that stand alone already live elsewhere (the decimated series in
:mod:`.trace`, the axes in :mod:`.axes`, the marker strip in :mod:`.ribbon`).
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, Qt, QTimer, Signal
from PySide6.QtWidgets import QGraphicsItem, QLabel, QSizePolicy, QVBoxLayout, QWidget

from lrviz.export import FigureSpec, Marker, PlotPanel, event_markers, plot_panels, smoothing_label

from . import theme
from .axes import StepAxis, panel_axis
from .ribbon import EventRibbon
from .trace import RunTrace
from .widgets import format_number

AXIS_WIDTH = 64
RIBBON_ROWS = 2


class _TimedView(pg.GraphicsLayoutWidget):
    """A GraphicsLayoutWidget that measures how long each paint takes (for the frame budget)."""

    last_paint_s = 0.0

    def paintEvent(self, event: Any) -> None:  # noqa: N802
        t = time.perf_counter()
        super().paintEvent(event)
        self.last_paint_s = time.perf_counter() - t


def _nice_step(span: float) -> float:
    return 10.0 ** math.floor(math.log10(span)) / 2 if span > 0 and math.isfinite(span) else 1.0


def nice_range(lo: float, hi: float, pad: float = 0.08) -> tuple[float, float]:
    """``lo..hi`` padded and rounded outwards to a coarse grid, so it changes only now and then."""
    span = hi - lo
    if not span > 0:
        span = abs(hi) * 0.1 or 1.0
        lo, hi = lo - span / 2, hi + span / 2
    lo, hi = lo - span * pad, hi + span * pad
    q = _nice_step(hi - lo) / 2
    return math.floor(lo / q) * q, math.ceil(hi / q) * q


_ENDS = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)


def nice_end(lo: float, hi: float) -> float:
    """Where a step axis that follows new steps should end: a little past ``hi``, on the next of
    1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k steps (the axis changes ~10 times a decade)."""
    span = max((hi - lo) * 1.02, 10.0)
    decade = 10.0 ** math.floor(math.log10(span))
    return lo + next(m * decade for m in _ENDS if m * decade >= span)


@dataclass
class _TraceItems:
    """The plot items of one drawn trace."""

    trace: RunTrace
    colour: str | None  # None: the primary run's own colours
    curves: dict[str, pg.PlotDataItem] = field(default_factory=dict)
    val_loss: pg.PlotDataItem | None = None
    val_acc: pg.PlotDataItem | None = None
    markers: list[Marker] = field(default_factory=list)
    marker_lines: dict[int, list[pg.InfiniteLine]] = field(default_factory=dict)  # by step, one per plot
    n_events: int = -1
    drawn: dict[str, tuple] = field(default_factory=dict)  # what each curve shows now (skip unchanged)


class TrainingPlots(QWidget):
    """Stacked plots sharing the step axis, with a crosshair readout and intervention markers."""

    #: Emitted with the step under the mouse (or -1 when it leaves the plots).
    hoveredStep = Signal(int)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        #: The panels, top to bottom, as lrviz.export.PLOT_PANELS lists them (the exported figures read it too).
        self.panels = {p.key: p for p in plot_panels()}
        self.PLOTS = tuple(self.panels)
        theme.configure_pyqtgraph()
        self._setting_range = False
        self._dirty = True
        self._kick = QTimer(self)  # a redraw soon after a zoom or pan, live run or not
        self._kick.setSingleShot(True)
        self._kick.setInterval(15)
        self._kick.timeout.connect(lambda: self.refresh())
        self.readout = QLabel(" ")
        self.readout.setObjectName("readout")
        font = self.readout.font()
        font.setPointSizeF(max(7.0, font.pointSizeF() - 1))
        self.readout.setFont(font)
        self.readout.setTextFormat(Qt.TextFormat.RichText)
        self.readout.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.readout.setMinimumHeight(self.readout.fontMetrics().height() + 6)
        # The legend: a row of its own above the plots, so it never covers a curve, a marker or a title.
        self.legend = QLabel("")
        self.legend.setObjectName("plotLegend")
        self.legend.setFont(font)
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        self.legend.setWordWrap(True)
        self.legend.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self._legend: list[tuple[object, str, str]] = []  # (item, swatch html, name)
        self.view = _TimedView()
        self.view.setObjectName("plotView")
        self.view.ci.setContentsMargins(4, 4, 12, 4)
        self.view.ci.setSpacing(2)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(2)
        lay.addWidget(self.readout)
        lay.addWidget(self.legend)
        lay.addWidget(self.view, 1)

        self.plots: dict[str, pg.PlotItem] = {}
        for name in self.PLOTS:
            p = pg.PlotItem(axisItems={"bottom": StepAxis("bottom"), "left": panel_axis(name)})
            p.setLabel("left", self.panels[name].title)
            p.getAxis("left").setWidth(AXIS_WIDTH)
            p.showGrid(x=True, y=True, alpha=theme.GRID_ALPHA)
            p.setClipToView(False)
            p.setDownsampling(auto=False)
            p.setMenuEnabled(True)
            p.hideButtons()  # the window's Fit button does the same for all plots at once
            for side in ("left", "bottom"):
                # Axis text and grid are drawn from a cached pixmap until the range changes; one
                # tick level fewer than pyqtgraph's default keeps regenerating them cheap.
                ax = p.getAxis(side)
                ax.setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)
                ax.setStyle(maxTickLevel=1, maxTextLevel=1)
            vb = p.getViewBox()
            vb.disableAutoRange()  # ranges follow the data in _apply_ranges, in coarse steps
            vb.sigXRangeChanged.connect(self._on_range_changed)
            vb.sigResized.connect(self._on_range_changed)
            vb.sigRangeChangedManually.connect(lambda *_, n=name: self._on_manual_range(n))
            self.plots[name] = p
        base = self.plots["loss"]
        for name in self.PLOTS[1:]:
            self.plots[name].setXLink(base)
        self.ribbon = EventRibbon(RIBBON_ROWS, axis_width=AXIS_WIDTH)
        self.ribbon.setXLink(base)
        self.ribbon.getViewBox().sigRangeChangedManually.connect(lambda *_: self._on_manual_range("ribbon"))
        self.plots["lr"].setLogMode(y=True)
        self._shown: list[str] = []
        self._show_accuracy = False
        self._relayout()

        self._hint = pg.TextItem("", color=theme.GREY, anchor=(0.5, 0.5))
        self._hint.setZValue(10)
        self.plots["loss"].addItem(self._hint, ignoreBounds=True)
        self.set_hint("")

        self._cross: dict[str, pg.InfiniteLine] = {}
        for name, p in self.plots.items():
            line = pg.InfiniteLine(angle=90, movable=False, pen=theme.pen(theme.GREY, 1, alpha=150))
            line.setVisible(False)
            line.setZValue(20)
            p.addItem(line, ignoreBounds=True)
            self._cross[name] = line
        self._mouse_proxy = pg.SignalProxy(self.view.scene().sigMouseMoved, rateLimit=60,
                                           slot=self._on_mouse_moved)
        self._hover_step = -1

        self.primary: _TraceItems | None = None
        self.overlays: list[_TraceItems] = []
        self._smoothing = 0.6
        self._dirty = True
        self.redraws = 0
        self._follow = True  # the step axis shows every step and grows with new ones
        self._auto_y = {name: True for name in self.PLOTS}
        self._x_target: tuple[float, float] | None = None
        self._y_target: dict[str, tuple[float, float]] = {}
        #: At most this fraction of the GUI thread goes to redrawing (training runs in its own process;
        #: the rest is for the mouse, the live connection's reader and the lab): the frame rate drops
        #: below the timer's 30 a second only when a frame is expensive.
        self.frame_budget = 0.5
        self._frame_cost = 0.0
        self._last_frame = 0.0
        self.last_refresh_s = 0.0

    # ---- layout -----------------------------------------------------------------------------
    def _relayout(self) -> None:
        """Place the ribbon and the plots once; later only show or hide the accuracy plot.

        (Removing items from a pyqtgraph GraphicsLayout and adding them back collapses its rows,
        so every plot stays in the layout and the accuracy plot is hidden at zero height.)
        """
        wanted = [name for name in self.PLOTS if name != "acc" or self._show_accuracy]
        if wanted == self._shown:
            return
        ci = self.view.ci
        if not self._shown:
            ci.addItem(self.ribbon, row=0, col=0)
            ci.layout.setRowStretchFactor(0, 0)
            for i, name in enumerate(self.PLOTS):
                ci.addItem(self.plots[name], row=i + 1, col=0)
        acc = self.plots["acc"]
        acc.setVisible(self._show_accuracy)
        acc.setMaximumHeight(16777215 if self._show_accuracy else 0)
        acc.setMinimumHeight(0)
        for i, name in enumerate(self.PLOTS):
            shown = name in wanted
            ci.layout.setRowStretchFactor(i + 1, self.panels[name].stretch if shown else 0)
            ci.layout.setRowSpacing(i + 1, 2 if shown else 0)
            last = name == wanted[-1]
            axis = self.plots[name].getAxis("bottom")
            axis.setStyle(showValues=last)
            axis.setHeight(None if last else 6)
            self.plots[name].setLabel("bottom", "step (optimizer updates)" if last else None)
            if not last:
                axis.showLabel(False)
        self._shown = wanted

    def set_hint(self, text: str) -> None:
        """A grey message in the middle of the loss plot (e.g. "press Start"); empty hides it."""
        self._hint.setText(text)
        self._hint.setVisible(bool(text))
        if text:
            vb = self.plots["loss"].getViewBox()
            (x0, x1), (y0, y1) = vb.viewRange()
            self._hint.setPos((x0 + x1) / 2, (y0 + y1) / 2)

    # ---- traces --------------------------------------------------------------------------------
    def set_primary(self, trace: RunTrace | None) -> None:
        """Draw ``trace`` as the main run (None clears it). Overlays stay."""
        if self.primary is not None:
            self._remove_items(self.primary)
        self.primary = None
        if trace is not None:
            trace.set_smoothing(self._smoothing)
            self.primary = _TraceItems(trace, None)
            self._make_items(self.primary)
        self._show_accuracy = False
        self._relayout()
        self.reset_view()
        self._dirty = True

    def set_overlays(self, traces: Sequence[RunTrace]) -> None:
        """Draw ``traces`` over the primary run, each in its own colour (replacing earlier overlays)."""
        for items in self.overlays:
            self._remove_items(items)
        self.overlays = []
        palette = theme.OVERLAYS if self.primary is None else theme.OVERLAYS_ON_LIVE
        for i, trace in enumerate(traces):
            trace.set_smoothing(self._smoothing)
            items = _TraceItems(trace, palette[i % len(palette)])
            self._make_items(items)
            self.overlays.append(items)
        self.reset_view()
        self._dirty = True

    def traces(self) -> list[RunTrace]:
        out = [self.primary.trace] if self.primary is not None else []
        return out + [o.trace for o in self.overlays]

    def _make_items(self, items: _TraceItems) -> None:
        items.trace.update()
        if items.colour is None:
            self._make_primary_items(items)
        else:
            self._make_overlay_items(items)

    def _curve(self, plot: str, p: Any, z: float = 0.0) -> pg.PlotDataItem:
        c = pg.PlotDataItem(pen=p, connect="finite")
        c.setZValue(z)
        self.plots[plot].addItem(c)
        return c

    def _make_primary_items(self, items: _TraceItems) -> None:
        tr = items.trace
        c = items.curves
        c["loss"] = self._curve("loss", theme.pen(theme.LOSS_RAW, 1, alpha=130), 1)
        c["loss_smooth"] = self._curve("loss", theme.pen(theme.LOSS_SMOOTH, 1), 2)
        items.val_loss = pg.PlotDataItem(pen=theme.pen(theme.VAL_LOSS, 1), symbol="o", symbolSize=5,
                                         symbolBrush=theme.VAL_LOSS, symbolPen=None)
        items.val_loss.setZValue(3)
        self.plots["loss"].addItem(items.val_loss)
        self._legend_add(c["loss"], "train loss", theme.LOSS_RAW)
        self._legend_add(c["loss_smooth"], smoothing_label(self._smoothing), theme.LOSS_SMOOTH)
        self._legend_add(items.val_loss, "validation loss", theme.VAL_LOSS, "-●-")
        items.val_acc = pg.PlotDataItem(pen=theme.pen(theme.ACCURACY, 1), symbol="o", symbolSize=5,
                                        symbolBrush=theme.ACCURACY, symbolPen=None)
        self.plots["acc"].addItem(items.val_acc)
        for p in self._column_panels():
            c[p.column] = self._curve(p.key, theme.pen(theme.panel_colour(p.key), 1), 1)
        self._ensure_lr_curves(items, max(1, tr.groups))

    def _ensure_lr_curves(self, items: _TraceItems, groups: int) -> None:
        have = sum(1 for k in items.curves if k.startswith("lr"))
        for g in range(have, groups):
            if items.colour is None:
                colour = theme.LR_GROUPS[g % len(theme.LR_GROUPS)]
                items.curves[f"lr{g}"] = self._curve("lr", theme.pen(colour, 1), 2)
                if g == 1:  # now several groups: the legend names each
                    self._legend_add(items.curves["lr0"], "lr group 0", theme.LR_GROUPS[0])
                if g >= 1:
                    self._legend_add(items.curves[f"lr{g}"], f"lr group {g}", colour)
            elif g == 0:
                items.curves["lr0"] = self._curve("lr", theme.pen(items.colour, 1), 2)

    def _make_overlay_items(self, items: _TraceItems) -> None:
        col = items.colour
        assert col is not None
        c = items.curves
        c["loss_smooth"] = self._curve("loss", theme.pen(col, 1), 4)
        self._legend_add(c["loss_smooth"], items.trace.label, col)
        items.val_loss = pg.PlotDataItem(pen=theme.pen(col, 1, dashed=True), symbol="t", symbolSize=6,
                                         symbolBrush=col, symbolPen=None)
        items.val_loss.setZValue(4)
        self.plots["loss"].addItem(items.val_loss)
        items.val_acc = pg.PlotDataItem(pen=theme.pen(col, 1), symbol="t", symbolSize=6, symbolBrush=col,
                                        symbolPen=None)
        self.plots["acc"].addItem(items.val_acc)
        for p in self._column_panels():
            c[p.column] = self._curve(p.key, theme.pen(col, 1, alpha=200), 3)
        self._ensure_lr_curves(items, 1)

    def _column_panels(self) -> list[PlotPanel]:
        """The panels that draw one per-step column as it is (the gradient norm's...)."""
        return [p for p in self.panels.values() if p.column is not None]

    def _remove_items(self, items: _TraceItems) -> None:
        for name, curve in items.curves.items():
            columns = {p.column: p.key for p in self._column_panels()}
            plot = columns.get(name) or ("loss" if name.startswith("loss") else "lr")
            self.plots[plot].removeItem(curve)
            self._legend_remove(curve)
        for item, plot in ((items.val_loss, "loss"), (items.val_acc, "acc")):
            if item is not None:
                self.plots[plot].removeItem(item)
                self._legend_remove(item)
        for lines in items.marker_lines.values():
            for line, plot in zip(lines, self.PLOTS):
                self.plots[plot].removeItem(line)
        items.marker_lines.clear()
        items.markers = []
        if items is self.primary:
            self.ribbon.set_markers([])

    # ---- the legend ------------------------------------------------------------------------------
    def _legend_add(self, item: object, name: str, colour: str, swatch: str = "━━") -> None:
        self._legend = [e for e in self._legend if e[0] is not item]
        self._legend.append((item, f"<span style='color:{colour}'>{swatch}</span>", name))
        self._show_legend()

    def _legend_remove(self, item: object) -> None:
        kept = [e for e in self._legend if e[0] is not item]
        if len(kept) != len(self._legend):
            self._legend = kept
            self._show_legend()

    def _legend_rename(self, item: object, name: str) -> None:
        self._legend = [(i, sw, name if i is item else n) for i, sw, n in self._legend]
        self._show_legend()

    def _show_legend(self) -> None:
        entries = [f"<span style='white-space:nowrap'>{sw}&nbsp;{html.escape(name)}</span>"
                   for _, sw, name in self._legend]
        self.legend.setText(" &nbsp; ".join(entries))
        self.legend.setVisible(bool(entries))

    def legend_texts(self) -> list[str]:
        """The legend's entries as shown."""
        return [name for _, _, name in self._legend] if self.legend.isVisibleTo(self) else []

    # ---- settings ------------------------------------------------------------------------------
    def set_smoothing(self, weight: float) -> None:
        """TensorBoard-style smoothing weight in [0, 1) for the loss (recomputes the history)."""
        weight = min(max(float(weight), 0.0), 0.999)
        if weight == self._smoothing:
            return
        self._smoothing = weight
        for items in ([self.primary] if self.primary else []) + self.overlays:
            items.trace.set_smoothing(weight)
            items.drawn.pop("loss_smooth", None)
        if self.primary is not None:
            self._legend_rename(self.primary.curves["loss_smooth"], smoothing_label(weight))
        self._dirty = True

    @property
    def smoothing(self) -> float:
        return self._smoothing

    def set_log_y(self, plot: str, on: bool) -> None:
        self.plots[plot].setLogMode(y=on)
        self._y_target.pop(plot, None)
        self._auto_y[plot] = True
        self._dirty = True
        self._kick.start()

    def figure_spec(self, title: str = "") -> FigureSpec:
        """What the plots show, as an exported figure should show it: the panels, the loss smoothing,
        the log axes and, once zoomed or panned, the steps in view."""
        x_range = None if self._follow else tuple(self.plots["loss"].getViewBox().viewRange()[0])
        return FigureSpec(title=title, smoothing=self._smoothing, log_loss=self.log_y("loss"),
                          log_lr=self.log_y("lr"), log_grad=self.log_y("grad"), panels=tuple(self._shown),
                          x_range=x_range)

    def log_y(self, plot: str) -> bool:
        return bool(self.plots[plot].ctrl.logYCheck.isChecked())

    def reset_view(self) -> None:
        """Fit every plot to all the data and follow new steps again."""
        self._follow = True
        self._auto_y = {name: True for name in self.PLOTS}
        self._x_target = None
        self._y_target = {}
        self._dirty = True
        self._kick.start()

    def _on_manual_range(self, plot: str) -> None:
        """The user panned or zoomed: stop following (the Fit button follows again)."""
        self._follow = False
        if plot in self._auto_y:
            self._auto_y[plot] = False
        self._dirty = True

    # ---- redraw ----------------------------------------------------------------------------------
    def _on_range_changed(self, *_: object) -> None:
        if self._setting_range:
            return  # our own follow/fit: the next frame draws with it anyway
        self._dirty = True
        if not self._kick.isActive():
            self._kick.start()  # redraw soon even when no run is live (zoom and pan of a stored run)

    def refresh(self, force: bool = False) -> bool:
        """Fold in new data and redraw when anything changed; True when it redrew.

        Skips the frame (returns False, keeps the data for the next) when the last frames cost more
        than ``frame_budget`` of the time since them: expensive frames lower the frame rate instead
        of taking the GIL from training.
        """
        now = time.perf_counter()
        if self.primary is not None:
            self._update_markers(self.primary)  # events are rare: mark them at once, frame or not
        wait = self.min_frame_interval() - (now - self._last_frame)
        if not force and wait > 0:
            if self._dirty and not self._kick.isActive():
                self._kick.start(int(wait * 1000) + 1)  # a zoom or pan: draw it as soon as allowed
            return False
        changed = False
        for items in self._all_items():
            if items.trace.update():
                changed = True
        if not (changed or self._dirty or force):
            return False
        self._dirty = False
        self._last_frame = now
        self._redraw()
        self.last_refresh_s = time.perf_counter() - now
        cost = self.last_refresh_s + self.view.last_paint_s
        self._frame_cost = 0.7 * self._frame_cost + 0.3 * cost if self._frame_cost else cost
        return True

    def min_frame_interval(self) -> float:
        """Seconds between frames that keep redrawing within ``frame_budget`` of the GUI thread."""
        return self._frame_cost / self.frame_budget

    def _all_items(self) -> list[_TraceItems]:
        return ([self.primary] if self.primary is not None else []) + self.overlays

    def _data_extent(self) -> tuple[float, float] | None:
        traces = [i.trace for i in self._all_items() if i.trace.rows]
        if not traces:
            return None
        return min(t.first_step for t in traces), max(t.last_step for t in traces)

    def _x_window(self) -> tuple[float, float, int]:
        """The step range to draw and the pixel width it maps onto."""
        vb = self.plots["loss"].getViewBox()
        ratio = max(1.0, self.devicePixelRatioF())
        width = max(50, int(vb.width() * ratio))
        extent = self._data_extent()
        if extent is None:
            return 0.0, 0.0, width
        lo, hi = extent
        if self._follow:
            end = nice_end(lo, hi)
            return lo, hi, max(50, int(width * (hi - lo) / max(end - lo, 1.0)))
        x0, x1 = vb.viewRange()[0]
        span = max(x1 - x0, 1.0)
        # Half a view of margin each side, at the same density: small pans need no new data.
        return max(lo, x0 - span / 2), min(hi, x1 + span / 2), width * 2

    def _apply_ranges(self) -> None:
        """Follow the data: the step axis ends on a round number past the last step, each y axis
        fits its curves, both in coarse steps (redrawing axes, grid and labels costs more than the
        curves, so they change only now and then)."""
        extent = self._data_extent()
        if extent is None:
            return
        self._setting_range = True
        try:
            self._fit_ranges(*extent)
        finally:
            self._setting_range = False

    def _fit_ranges(self, lo: float, hi: float) -> None:
        if self._follow:
            target = (lo, nice_end(lo, hi))
            if target != self._x_target:
                self._x_target = target
                self.plots["loss"].getViewBox().setXRange(*target, padding=0)
        x0, x1 = self.plots["loss"].getViewBox().viewRange()[0]
        for name in self._shown:
            if not self._auto_y.get(name, False):
                continue
            lows, highs = [], []
            for item in self.plots[name].listDataItems():
                if not item.isVisible():
                    continue
                try:
                    b = item.dataBounds(1, orthoRange=(x0, x1))
                except Exception:  # noqa: BLE001 - an empty or all-NaN curve
                    continue
                if b is not None and b[0] is not None and math.isfinite(b[0]) and math.isfinite(b[1]):
                    lows.append(b[0])
                    highs.append(b[1])
            if not lows:
                continue
            want = nice_range(min(lows), max(highs))
            have = self._y_target.get(name)
            if have is not None and have[0] <= want[0] and want[1] <= have[1] and \
                    (have[1] - have[0]) <= 2.5 * (want[1] - want[0]):
                continue  # still fits, and not much too loose: leave it
            self._y_target[name] = want
            self.plots[name].getViewBox().setYRange(*want, padding=0)

    def _redraw(self) -> None:
        self.redraws += 1
        x0, x1, width = self._x_window()
        items_all = self._all_items()
        any_acc = False
        for items in items_all:
            tr = items.trace
            if items.colour is None and tr.groups > 1:
                self._ensure_lr_curves(items, tr.groups)
            for name, curve in items.curves.items():
                key = (x0, x1, width, tr.rows, tr.smoothing if name == "loss_smooth" else None)
                if items.drawn.get(name) == key:
                    continue  # same rows, same window: nothing to redo
                items.drawn[name] = key
                x, y = tr.query(name, x0, x1, width)
                finite = bool(np.isfinite(y).all())
                curve.setData(x, y, connect="all" if finite else "finite", skipFiniteCheck=finite)
            n_val = len(tr.validation)
            if items.drawn.get("validation") != (n_val,):
                items.drawn["validation"] = (n_val,)
                vs, vl, va = tr.validation_arrays()
                if items.val_loss is not None:
                    symbol = None if len(vs) > 200 else ("o" if items.colour is None else "t")
                    items.val_loss.setData(vs, vl, symbol=symbol)
                if items.val_acc is not None:
                    good = np.isfinite(va)
                    items.val_acc.setData(vs[good], 100.0 * va[good])
            if items.val_acc is not None and len(tr.validation) and tr.has_accuracy():
                any_acc = True
            if items.colour is None:
                self._update_markers(items)
        if any_acc != self._show_accuracy:
            self._show_accuracy = any_acc
            self._relayout()
        self._apply_ranges()
        has_data = any(i.trace.rows for i in items_all)
        if has_data and self._hint.isVisible():
            self.set_hint("")

    # ---- markers ---------------------------------------------------------------------------------
    def _update_markers(self, items: _TraceItems) -> None:
        """Mark the run's events (see :func:`lrviz.export.event_markers`, shared with exported figures):
        a line at each marker's step across every plot, its label in the ribbon."""
        events = items.trace.events
        n = len(events)
        if n == items.n_events:
            return
        items.n_events = n
        items.markers = event_markers(list(events[:n]))
        styled = []
        for m in items.markers:
            colour, dashed = theme.EVENT_STYLE.get(m.kinds[0], (theme.GREY, True))
            if m.alarm:
                colour, dashed = theme.VERMILLION, False
            lines = items.marker_lines.get(m.step)
            if lines is None:
                lines = items.marker_lines[m.step] = []
                for name in self.PLOTS:
                    line = pg.InfiniteLine(pos=m.step, angle=90, movable=False)
                    line.setZValue(5)
                    self.plots[name].addItem(line, ignoreBounds=True)
                    lines.append(line)
            for line in lines:
                line.setPen(theme.pen(colour, 1, alpha=200, dashed=dashed))
            styled.append((m, colour))
        self.ribbon.set_markers(styled)

    def marker_texts(self) -> dict[int, str]:
        """The primary run's marker labels by step (for tests and screenshots)."""
        if self.primary is None:
            return {}
        return {m.step: m.text for m in self.primary.markers}

    # ---- crosshair --------------------------------------------------------------------------------
    def _on_mouse_moved(self, args: tuple[QPointF]) -> None:
        pos = args[0]
        for name in self._shown:
            vb = self.plots[name].getViewBox()
            if vb.sceneBoundingRect().contains(pos):
                x = vb.mapSceneToView(pos).x()
                self.show_crosshair(int(round(x)))
                return
        self.show_crosshair(-1)

    def show_crosshair(self, step: int) -> None:
        """Put the crosshair at ``step`` and show the values there (-1 hides it)."""
        self._hover_step = step
        for line in self._cross.values():
            line.setVisible(step >= 0)
            if step >= 0:
                line.setPos(step)
        self.readout.setText(self.readout_text(step) if step >= 0 else " ")
        self.hoveredStep.emit(step)

    def readout_text(self, step: int) -> str:
        """The crosshair's readout (HTML): step, epoch, loss, smoothed, learning rates, grad norm, validation."""
        parts: list[str] = [f"<b>step {step}</b>"]

        def sw(col: str, text: str) -> str:
            return f"<span style='color:{col}'>&#9632;</span>&nbsp;{text}"

        if self.primary is not None:
            tr = self.primary.trace
            v = tr.value_at(step)
            if v is not None:
                parts.append(sw(theme.LOSS_RAW, f"loss {format_number(v['loss'], 4)}"))
                parts.append(sw(theme.LOSS_SMOOTH, f"smooth {format_number(v['loss_smooth'], 4)}"))
                lrs = v["lr"]
                for g, lr in enumerate(lrs):
                    name = "lr" if len(lrs) == 1 else f"lr[{g}]"
                    parts.append(sw(theme.LR_GROUPS[g % len(theme.LR_GROUPS)], f"{name} {format_number(lr, 4)}"))
                parts.append(sw(theme.GRAD_NORM, f"grad {format_number(v['grad_norm'], 3)}"))
            p = tr.validation_near(step)
            if p is not None:
                acc = f" ({100 * p.accuracy:.1f}%)" if p.accuracy is not None else ""
                parts.append(sw(theme.VAL_LOSS, f"val {format_number(p.loss, 4)}{acc}"))
        for o in self.overlays:
            v = o.trace.value_at(step)
            if v is not None and o.colour is not None:
                name = o.trace.label.split(" ")[0]
                parts.append(sw(o.colour, f"{name} {format_number(v['loss_smooth'], 4)}, "
                                          f"lr {format_number(v['lr'][0], 3)}"))
        return " &nbsp;".join(parts)

    def leaveEvent(self, event: Any) -> None:  # noqa: N802
        self.show_crosshair(-1)
        super().leaveEvent(event)
