"""Publication-grade static plots of one or several runs, drawn offscreen: PNG, SVG and PDF.

Entry points
------------
``render_run(data, path, fmt=None, *, title=None, kind="both", size=(1200, 800), loss_log=None, figure=None)``
    Draw ``data`` (one :class:`RunData` or a sequence of them, overlaid) and write it to ``path``
    through :func:`lrviz.export.atomic_write`; returns ``path``. ``fmt`` is ``"png"``, ``"svg"``
    or ``"pdf"`` (default: the suffix of ``path``). What is drawn is described by ``figure``, a
    :class:`lrviz.export.FigureSpec` -- the same description the app's live plots follow, so an
    export from the app is what was on screen: its panels (loss, learning rate, gradient norm,
    validation accuracy), its loss smoothing, its log axes, the steps in view. Without one, ``kind``
    picks the panels (``"loss"``, ``"lr"`` or ``"both"``), ``loss_log`` the loss axis (``None``:
    log when the finite losses are positive and span a factor of 50 or more) and ``title`` the
    title, with the app's defaults for the rest. ``size`` is the figure in pixels (the PNG's size;
    SVG and PDF have the same layout at 96 dpi, i.e. 12.5 x 8.3 in by default); fonts scale with it.
``render_bytes(data, fmt, *, ...)``
    The same file content, in memory.

What is drawn, as in the app: the training loss per batch and smoothed (TensorBoard's debiased
exponential moving average, :class:`lrviz.decimate.EmaSmoother`, with the figure's weight), the
validation points, the learning rate per parameter group, a legend row, and a marker at every
event of :func:`lrviz.export.event_markers` (a line across the panels, its label in a strip above
them laid out by :mod:`lrviz.ui.ribbon`, so labels never collide). A run whose ``colour`` is None
is drawn in the app's colours for the shown run; the others (overlays) as their smoothed loss in
their colour, Okabe-Ito by default. Long histories are reduced to the minimum and maximum of each
pixel column (peak decimation), so files stay small and a one-step spike stays visible.

Needs a ``QApplication``; one is created when none exists (on Linux without a display, with the
``offscreen`` platform). Call from the GUI thread.

Why ~870 lines in one module: two figures (a run's, and the LR range test's, about 200 lines at the
end) share its drawing helpers (fonts, title wrapping, decimation, encoding to PNG/SVG/PDF), and
``lrviz find-lr`` imports the range test's from here.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QBuffer, QIODevice, QMarginsF, QRect, QRectF, QSize, QSizeF, Qt
from PySide6.QtGui import QColor, QFont, QFontMetrics, QImage, QPageSize, QPainter, QPdfWriter
from PySide6.QtSvg import QSvgGenerator
from PySide6.QtWidgets import QApplication, QSizePolicy

from lrviz import export as _export_module
from lrviz.decimate import EmaSmoother
from lrviz.errors import ConfigError
from lrviz.export import (
    FigureSpec,
    PlotPanel,
    atomic_write,
    event_markers,
    format_number,
    plot_panel,
    plot_panels,
    smoothing_label,
)
from lrviz.records import Event, ValPoint

from . import theme
from .axes import StepAxis, ValueAxis, panel_axis
from .ribbon import EventRibbon

__all__ = [
    "KINDS",
    "PALETTE",
    "RENDER_FORMATS",
    "RunData",
    "ensure_app",
    "figure_spec",
    "peak_decimate",
    "render_bytes",
    "render_run",
]

log = logging.getLogger(__name__)

RENDER_FORMATS = ("png", "svg", "pdf")
KINDS = ("loss", "lr", "both")
#: Okabe-Ito: distinguishable with the common colour-vision deficiencies (yellow left out: too pale).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
_TEXT = "#222222"
_AXIS = "#444444"
_DPI = 96.0
_KIND_PANELS = {"loss": ("loss",), "lr": ("lr",), "both": ("loss", "lr")}

_app: QApplication | None = None


@dataclass
class RunData:
    """One run to draw: a legend label and its records.

    ``steps`` is a dict like ``StepBuffer.view()`` / ``RunStore.load_steps()`` (``step``,
    ``loss``, ``lr`` of shape (n, groups)...); ``events`` and ``validation`` as the engine and
    the store give them. ``colour`` None draws the run as the app draws the run it shows (several
    such runs get palette colours); a colour draws it as an overlay. ``marked`` draws its events.
    """

    label: str
    steps: Mapping[str, np.ndarray]
    events: list[Event] = field(default_factory=list)
    validation: list[ValPoint] = field(default_factory=list)
    colour: str | None = None
    marked: bool = True

    @classmethod
    def from_store(cls, store: Any, run_ref: int | str, label: str | None = None, **kw: Any) -> RunData:
        """Load a stored run (by id or name); the label defaults to the run's name."""
        info = store.get_run(run_ref)
        return cls(
            label=label or info.name,
            steps=store.load_steps(info.id),
            events=store.load_events(info.id),
            validation=store.load_validation(info.id),
            **kw,
        )


def ensure_app() -> QApplication:
    """The running QApplication, or a new one (``offscreen`` on Linux when there is no display)."""
    global _app
    app = QApplication.instance()
    if app is None:
        headless = sys.platform.startswith("linux") and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
        )
        if headless:
            os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
        app = QApplication([sys.argv[0] if sys.argv and sys.argv[0] else "lrviz"])
        _app = app
    elif not isinstance(app, QApplication):
        raise ConfigError("plot export needs a QApplication, but this program runs a QGuiApplication")
    return app


# --------------------------------------------------------------------------- data reduction


def peak_decimate(x: np.ndarray, y: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``2 * bins`` points keeping each bin's minimum and maximum, in step order.

    Non-finite values are never chosen over finite ones; a bin with none finite gives NaN
    (a gap). Short series are returned unchanged (as float64).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    bins = max(1, int(bins))
    if n <= 2 * bins:
        return x, y
    per = math.ceil(n / bins)
    nb = math.ceil(n / per)
    finite = np.isfinite(y)
    lo_src = np.full(nb * per, np.inf)
    hi_src = np.full(nb * per, -np.inf)
    lo_src[:n] = np.where(finite, y, np.inf)
    hi_src[:n] = np.where(finite, y, -np.inf)
    offsets = np.arange(nb) * per
    imin = np.argmin(lo_src.reshape(nb, per), axis=1) + offsets
    imax = np.argmax(hi_src.reshape(nb, per), axis=1) + offsets
    first = np.minimum(imin, imax)
    second = np.maximum(imin, imax)
    idx = np.minimum(np.column_stack([first, second]).ravel(), n - 1)
    xs = x[idx]
    ys = y[idx].copy()
    ys[~np.isfinite(ys)] = np.nan
    return xs, ys


# --------------------------------------------------------------------------- drawing helpers


def _font(px: int, bold: bool = False) -> QFont:
    font = QFont()
    font.setPixelSize(max(6, int(px)))
    font.setBold(bold)
    return font


def _color(hex_color: str, alpha: int = 255) -> QColor:
    c = QColor(hex_color)
    c.setAlpha(alpha)
    return c


def _wrap_title(title: str, font: QFont, width: int) -> str:
    """The title as rich text, broken at `` · `` (then spaces) into lines that fit ``width``."""
    metrics = QFontMetrics(font)
    lines: list[str] = []
    for para in title.splitlines() or [""]:
        pieces = para.split(" · ")
        current = ""
        for piece in pieces:
            candidate = piece if not current else f"{current} · {piece}"
            if current and metrics.horizontalAdvance(candidate) > width:
                lines.append(current)
                current = piece
            else:
                current = candidate
        lines.append(current)
    fitted = [metrics.elidedText(line, Qt.TextElideMode.ElideMiddle, width) for line in lines]
    return "<br>".join(html.escape(line) for line in fitted)


def _lr_matrix(steps: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    lr = steps.get("lr")
    if lr is None:
        return np.empty((n, 0))
    lr = np.asarray(lr, dtype=np.float64)
    return lr.reshape(n, -1) if lr.size or n else np.empty((0, 1))


def _rows(steps: Mapping[str, np.ndarray]) -> int:
    for name in ("step", "loss", "lr"):
        if name in steps:
            return len(steps[name])
    return 0


def _x_of(steps: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    step = steps.get("step")
    return np.arange(n, dtype=np.float64) if step is None else np.asarray(step, dtype=np.float64)


def _positive(y: np.ndarray) -> np.ndarray:
    y = np.array(y, dtype=np.float64)
    y[~(y > 0) | ~np.isfinite(y)] = np.nan
    return y


class _OffscreenFigure:
    """What both figures share: a white, frameless layout the size of the image, shown offscreen only,
    with fonts and margins in proportion to it (``base`` px), painted once and closed."""

    def __init__(self, size: tuple[int, int], spacing: float):
        self.width, self.height = int(size[0]), int(size[1])
        self.base = base = max(9.0, min(self.width, self.height * 1.5) / 75.0)  # 16 px at 1200 x 800
        self.pad = pad = round(base * 0.6)
        win = self.win = pg.GraphicsLayoutWidget()
        win.setBackground("w")
        win.setAttribute(Qt.WidgetAttribute.WA_DontShowOnScreen, True)
        win.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        win.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        win.setFrameShape(win.Shape.NoFrame)
        win.resize(self.width, self.height)
        win.ci.setContentsMargins(pad, pad, pad * 1.5, pad)
        win.ci.setSpacing(round(base * spacing))

    def _boxed_plot(self, row: int, axes: dict[str, pg.AxisItem], tick_px: int,
                    bottom_values: bool = True) -> pg.PlotItem:
        """A plot at ``row`` framed by four axes in the figure's style: values on the left and (with
        ``bottom_values``) at the bottom, the left axis wide enough for its tick labels."""
        plot = self.win.addPlot(row=row, col=0, axisItems=axes)
        plot.setMenuEnabled(False)
        plot.hideButtons()
        plot.showGrid(x=True, y=True, alpha=0.12)
        plot.showAxis("top")
        plot.showAxis("right")
        tick_font = _font(tick_px)
        for side in ("left", "bottom", "top", "right"):
            axis = plot.getAxis(side)
            axis.setPen(pg.mkPen(_AXIS, width=1))
            axis.setTextPen(pg.mkPen(_TEXT))
            axis.enableAutoSIPrefix(False)
            axis.setStyle(tickFont=tick_font, tickLength=-round(tick_px * 0.45), tickTextOffset=round(tick_px * 0.4))
            if side in ("top", "right") or (side == "bottom" and not bottom_values):
                axis.setStyle(showValues=False)
        plot.getAxis("left").setWidth(round(tick_px * 4.6))
        return plot

    def paint(self, painter: QPainter) -> None:
        self.win.render(painter, QRectF(0, 0, self.width, self.height), self.win.viewport().rect())

    def close(self) -> None:
        self.win.close()
        self.win.deleteLater()


class _Figure(_OffscreenFigure):
    """The title, legend row, event strip and panels a :class:`FigureSpec` describes, ready to be painted."""

    def __init__(self, runs: Sequence[RunData], spec: FigureSpec, size: tuple[int, int]):
        super().__init__(size, spacing=0.3)
        base, pad, win = self.base, self.pad, self.win
        self.tick_px = round(base * 0.82)
        self.label_px = round(base * 0.95)
        self.legend_px = round(base * 0.82)
        self.marker_px = round(base * 0.8)
        self.title_px = round(base * 1.1)
        self.runs = list(runs)
        self.spec = spec
        self.colours = self._run_colours()
        self.bins = max(50, self.width)

        self.legend: list[tuple[pg.PlotDataItem, str]] = []
        row = 0
        if spec.title:
            font = _font(self.title_px, bold=True)
            text = _wrap_title(spec.title, font, self.width - 4 * pad)
            label = win.addLabel(text, row=row, col=0, size=f"{self.title_px}px", color=_TEXT, bold=True)
            label.item.setFont(font)
            lines = text.count("<br>") + 1
            label.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)
            label.setMaximumHeight(lines * round(self.title_px * 1.5) + pad)
            row += 1
        legend_row = row
        row += 1
        self.markers = [(i, m) for i, r in enumerate(self.runs) if r.marked for m in event_markers(r.events)]
        self.ribbon: EventRibbon | None = None
        if self.markers:
            self.ribbon = EventRibbon(2, row_px=round(self.marker_px * 1.45), axis_width=round(self.tick_px * 4.6),
                                      font=_font(self.marker_px))
            win.addItem(self.ribbon, row=row, col=0)
            row += 1
        known = {p.key: p for p in plot_panels()}
        panels = [p for p in spec.panels if p in known and (p != "acc" or self._has_accuracy())] or ["loss"]
        self.plots: dict[str, pg.PlotItem] = {}
        for k, name in enumerate(panels):
            plot = self._add_plot(row, name, last=k == len(panels) - 1)
            win.ci.layout.setRowStretchFactor(row, known[name].stretch)
            row += 1
            if known[name].column is not None:
                self._draw_column(plot, known[name])
            else:
                getattr(self, f"_draw_{name}")(plot)
        first = self.plots[panels[0]]
        for plot in self.plots.values():
            if plot is not first:
                plot.setXLink(first)
        if self.ribbon is not None:
            self.ribbon.setXLink(first)
            self._draw_markers()
        self._add_legend(legend_row, self.width - 4 * pad)
        if not any(len(r.steps.get("loss", ())) for r in self.runs):
            self._no_data(first)

    # ---- colours ----

    def _run_colours(self) -> list[str | None]:
        """Each run's colour: None for the one run drawn as the app draws the run it shows."""
        plain = [i for i, r in enumerate(self.runs) if r.colour is None]
        if len(plain) == 1:
            return [r.colour for r in self.runs]
        used = {r.colour for r in self.runs if r.colour}
        free = [c for c in PALETTE if c not in used] or list(PALETTE)
        it = iter(free * (len(plain) // len(free) + 1))
        return [r.colour or next(it) for r in self.runs]

    def _has_accuracy(self) -> bool:
        return any(p.accuracy is not None for r in self.runs for p in r.validation)

    # ---- layout ----

    def _add_plot(self, row: int, name: str, last: bool) -> pg.PlotItem:
        axes = {"bottom": StepAxis("bottom"), "left": panel_axis(name)}
        plot = self._boxed_plot(row, axes, self.tick_px, bottom_values=last)
        plot.setClipToView(False)
        plot.setDownsampling(auto=False)
        style = {"font-size": f"{self.label_px}px", "color": _TEXT}
        if not last:
            plot.getAxis("bottom").setHeight(round(self.tick_px * 0.5))
        plot.setLabel("left", plot_panel(name).title, **style)
        if last:
            plot.setLabel("bottom", "step (optimizer updates)", **style)
        plot.vb.setDefaultPadding(0.015)
        self.plots[name] = plot
        return plot

    def _curve(self, plot: pg.PlotItem, x: np.ndarray, y: np.ndarray, *, name: str | None = None,
               **opts: Any) -> pg.PlotDataItem:
        xs, ys = peak_decimate(x, y, self.bins)
        item = pg.PlotDataItem(xs, ys, connect="finite", antialias=True, **opts)
        plot.addItem(item)
        if name:
            self.legend.append((item, name))
        return item

    def _points(self, plot: pg.PlotItem, x: np.ndarray, y: np.ndarray, colour: str, primary: bool,
                name: str | None) -> None:
        if not len(x):
            return
        item = pg.PlotDataItem(
            x, y, pen=pg.mkPen(colour, width=1.4, style=Qt.PenStyle.SolidLine if primary else Qt.PenStyle.DashLine),
            symbol="o" if primary else "t", symbolSize=max(6, round(self.tick_px * 0.6)),
            symbolBrush=pg.mkBrush(colour), symbolPen=pg.mkPen("w", width=1), connect="finite", antialias=True)
        plot.addItem(item)
        if name:
            self.legend.append((item, name))

    # ---- panels ----

    def _draw_loss(self, plot: pg.PlotItem) -> None:
        all_loss = [np.asarray(r.steps.get("loss", np.empty(0)), dtype=np.float64) for r in self.runs]
        all_val = [np.array([p.loss for p in r.validation], dtype=np.float64) for r in self.runs]
        log = self.spec.log_loss
        if log is None:
            values = np.concatenate([*all_loss, *all_val]) if self.runs else np.empty(0)
            values = values[np.isfinite(values)]
            log = bool(values.size and values.min() > 0 and values.max() / values.min() >= 50)
        if log:
            plot.setLogMode(x=False, y=True)
        weight = min(max(float(self.spec.smoothing), 0.0), 0.999)
        for run, colour, loss, val in zip(self.runs, self.colours, all_loss, all_val):
            x = _x_of(run.steps, len(loss))
            smooth = EmaSmoother(weight).extend(loss)  # as the app smooths it
            if log:
                loss, smooth, val = _positive(loss), _positive(smooth), _positive(val)
            if colour is None:
                if len(loss):
                    self._curve(plot, x, loss, name="train loss", pen=pg.mkPen(_color(theme.LOSS_RAW, 130), width=1))
                    self._curve(plot, x, smooth, name=smoothing_label(weight), pen=pg.mkPen(theme.LOSS_SMOOTH, width=2.2))
                vx = np.array([p.step for p in run.validation], dtype=np.float64)
                self._points(plot, vx, val, theme.VAL_LOSS, True, "validation loss")
            else:
                if len(loss):
                    self._curve(plot, x, smooth, name=run.label, pen=pg.mkPen(colour, width=2.2))
                vx = np.array([p.step for p in run.validation], dtype=np.float64)
                self._points(plot, vx, val, colour, False, None)

    def _draw_lr(self, plot: pg.PlotItem) -> None:
        plot.setLogMode(x=False, y=bool(self.spec.log_lr))
        for run, colour in zip(self.runs, self.colours):
            n = _rows(run.steps)
            lr = _lr_matrix(run.steps, n)
            x = _x_of(run.steps, n)
            groups = lr.shape[1] if colour is None else min(1, lr.shape[1])
            for g in range(groups):
                c = theme.LR_GROUPS[g % len(theme.LR_GROUPS)] if colour is None else colour
                name = f"lr group {g}" if colour is None and lr.shape[1] > 1 else None
                y = _positive(lr[:, g]) if self.spec.log_lr else lr[:, g]
                self._curve(plot, x, y, name=name, pen=pg.mkPen(c, width=2.0))

    def _draw_column(self, plot: pg.PlotItem, panel: PlotPanel) -> None:
        """A panel of one per-step column, each run's as it is (the gradient norm's axis may be log)."""
        log = bool(self.spec.log_grad) if panel.key == "grad" else False
        plot.setLogMode(x=False, y=log)
        for run, colour in zip(self.runs, self.colours):
            g = np.asarray(run.steps.get(panel.column, np.empty(0)), dtype=np.float64)
            y = _positive(g) if log else g
            c = _color(theme.panel_colour(panel.key)) if colour is None else _color(colour, 200)
            self._curve(plot, _x_of(run.steps, len(g)), y, pen=pg.mkPen(c, width=1.4))

    def _draw_acc(self, plot: pg.PlotItem) -> None:
        for run, colour in zip(self.runs, self.colours):
            pts = [p for p in run.validation if p.accuracy is not None]
            x = np.array([p.step for p in pts], dtype=np.float64)
            y = np.array([100.0 * p.accuracy for p in pts], dtype=np.float64)
            self._points(plot, x, y, theme.ACCURACY if colour is None else colour, colour is None, None)

    def _draw_markers(self) -> None:
        """A line across every panel at each marker, its label in the strip above (as in the app)."""
        assert self.ribbon is not None
        styled = []
        for i, m in self.markers:
            own = self.colours[i]
            colour, dashed = theme.EVENT_STYLE.get(m.kinds[0], (theme.GREY, True)) if own is None else (own, True)
            if m.alarm:
                colour, dashed = theme.VERMILLION, False
            for plot in self.plots.values():
                pen = pg.mkPen(_color(colour, 200), width=1.3,
                               style=Qt.PenStyle.DashLine if dashed else Qt.PenStyle.SolidLine)
                line = pg.InfiniteLine(pos=float(m.step), angle=90, pen=pen, movable=False)
                line.setZValue(-5)
                plot.addItem(line, ignoreBounds=True)
            styled.append((m, colour))
        self.ribbon.set_markers(styled)

    def _set_x_range(self) -> None:
        """The steps in view on screen, else from the first to the last of all runs (1 % margin)."""
        if self.spec.x_range is not None:
            lo, hi = (float(v) for v in self.spec.x_range)
            pad = 0.0
        else:
            lo, hi = math.inf, -math.inf
            for run in self.runs:
                x = _x_of(run.steps, _rows(run.steps))
                if len(x):
                    lo, hi = min(lo, float(x[0])), max(hi, float(x[-1]))
                for p in run.validation:
                    lo, hi = min(lo, float(p.step)), max(hi, float(p.step))
            pad = 0.01
        if not math.isfinite(lo) or not math.isfinite(hi):
            return
        if hi <= lo:
            hi = lo + 1.0
        for plot in self.plots.values():
            plot.setXRange(lo, hi, padding=pad)
            if self.spec.x_range is not None:
                plot.vb.setAutoVisible(y=True)  # each y axis fits what is in view, as on screen

    def _add_legend(self, row: int, width: int) -> None:
        """One legend for the figure, in a row under the title, wrapped into columns that fit."""
        if not self.legend:
            return
        from pyqtgraph.graphicsItems.LegendItem import ItemSample

        font = _font(self.legend_px)
        metrics = QFontMetrics(font)
        sample_w = 28
        widths = [sample_w + metrics.horizontalAdvance(name) + round(self.legend_px * 2.2) for _, name in self.legend]
        ncol = len(widths)
        while ncol > 1:
            cols = [max(widths[c::ncol]) for c in range(ncol)]
            if sum(cols) <= width:
                break
            ncol -= 1
        box = self.win.addLayout(row=row, col=0)
        box.setContentsMargins(0, 0, 0, 0)
        box.setSpacing(0)
        box.layout.setHorizontalSpacing(round(self.legend_px * 0.4))
        box.layout.setVerticalSpacing(0)
        box.addLabel("", row=0, col=0)  # stretchable margins centre the entries
        box.addLabel("", row=0, col=2 * ncol + 1)
        for i, (item, name) in enumerate(self.legend):
            r, c = divmod(i, ncol)
            sample = ItemSample(item)
            sample.setFixedWidth(sample_w)
            box.addItem(sample, row=r, col=1 + 2 * c)
            label = box.addLabel(html.escape(name), row=r, col=2 + 2 * c, color=_TEXT,
                                 size=f"{self.legend_px}px", justify="left")
            label.item.setFont(font)
            label.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Preferred)
        box.layout.setColumnStretchFactor(0, 1)
        box.layout.setColumnStretchFactor(2 * ncol + 1, 1)
        rows = math.ceil(len(self.legend) / ncol)
        height = rows * round(self.legend_px * 1.9)
        box.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)
        box.setMinimumHeight(height)
        box.setMaximumHeight(height)

    def _no_data(self, plot: pg.PlotItem) -> None:
        text = pg.TextItem("no steps recorded", color=_TEXT, anchor=(0.5, 0.5))
        text.setFont(_font(self.label_px))
        plot.addItem(text, ignoreBounds=True)
        text.setPos(0.5, 0.5)
        plot.setRange(xRange=(0, 1), yRange=(0, 1))

    # ---- output ----

    def settle(self) -> None:
        """Lay out and auto-range everything (the widget is shown offscreen, never on screen)."""
        self.win.show()
        app = QApplication.instance()
        for _ in range(3):
            app.processEvents()
        # After the layout: linked views align their ranges by on-screen geometry.
        self._set_x_range()
        for plot in self.plots.values():
            plot.vb.updateAutoRange()
        for _ in range(2):
            app.processEvents()
        if self.ribbon is not None:
            self.ribbon.relayout()


def _normalise(data: RunData | Sequence[RunData]) -> list[RunData]:
    runs = [data] if isinstance(data, RunData) else list(data)
    if not runs:
        raise ConfigError("nothing to plot: no runs given")
    for r in runs:
        if not isinstance(r, RunData):
            raise TypeError(f"render needs RunData, not {type(r).__name__}")
    return runs


def _paint(fig: Any, device: Any, *, text_antialiasing: bool = False) -> None:
    """Paint ``fig`` onto a paint device (an image, an SVG generator, a PDF writer), antialiased."""
    painter = QPainter(device)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    if text_antialiasing:
        painter.setRenderHint(QPainter.RenderHint.TextAntialiasing)
    fig.paint(painter)
    painter.end()


def _encode(fig: Any, fmt: str, w: int, h: int, doc_title: str) -> bytes:
    """Paint a settled figure into PNG, SVG or PDF bytes (w x h pixels at _DPI)."""
    buf = QBuffer()
    buf.open(QIODevice.OpenModeFlag.WriteOnly)
    if fmt == "png":
        image = QImage(w, h, QImage.Format.Format_ARGB32)
        image.setDotsPerMeterX(round(_DPI / 0.0254))
        image.setDotsPerMeterY(round(_DPI / 0.0254))
        image.fill(QColor("white"))
        _paint(fig, image, text_antialiasing=True)
        if not image.save(buf, "PNG"):
            raise ConfigError("Qt could not encode the plot as PNG")
    elif fmt == "svg":
        gen = QSvgGenerator()
        gen.setOutputDevice(buf)
        gen.setSize(QSize(w, h))
        gen.setViewBox(QRect(0, 0, w, h))
        gen.setResolution(round(_DPI))
        gen.setTitle(doc_title)
        gen.setDescription("Drawn by lrviz")
        _paint(fig, gen)
    else:
        pdf = QPdfWriter(buf)
        pdf.setResolution(round(_DPI))
        pdf.setPageSize(QPageSize(QSizeF(w * 72.0 / _DPI, h * 72.0 / _DPI), QPageSize.Unit.Point, "lrviz"))
        pdf.setPageMargins(QMarginsF(0, 0, 0, 0))
        pdf.setTitle(doc_title)
        pdf.setCreator("lrviz")
        _paint(fig, pdf)
    buf.close()
    return bytes(buf.data())


def figure_spec(*, title: str | None = None, kind: str = "both", loss_log: bool | None = None,
                figure: FigureSpec | None = None) -> FigureSpec:
    """The description to draw: ``figure`` as given (``title``, when given, replacing its title), else
    the app's defaults with the panels of ``kind`` and the loss axis of ``loss_log``."""
    if figure is not None:
        return figure if title is None else dataclasses.replace(figure, title=title)
    if kind not in KINDS:
        raise ConfigError(f"unknown plot kind {kind!r}; choose loss, lr or both")
    return FigureSpec(title=title or "", panels=_KIND_PANELS[kind], log_loss=loss_log)


def render_bytes(
    data: RunData | Sequence[RunData],
    fmt: str,
    *,
    title: str | None = None,
    kind: str = "both",
    size: tuple[int, int] = (1200, 800),
    loss_log: bool | None = None,
    figure: FigureSpec | None = None,
) -> bytes:
    """The plot file's content (see the module docstring for the arguments)."""
    fmt = str(fmt).lower().lstrip(".")
    if fmt not in RENDER_FORMATS:
        raise ConfigError(f"unknown plot format {fmt!r}; choose png, svg or pdf")
    spec = figure_spec(title=title, kind=kind, loss_log=loss_log, figure=figure)
    w, h = int(size[0]), int(size[1])
    if w < 200 or h < 150:
        raise ConfigError(f"a plot must be at least 200 x 150 pixels, not {w} x {h}")
    runs = _normalise(data)
    ensure_app()
    fig = _Figure(runs, spec, size=(w, h))
    try:
        fig.settle()
        return _encode(fig, fmt, w, h, spec.title or "lrviz plot")
    finally:
        fig.close()


def render_run(
    data: RunData | Sequence[RunData],
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    title: str | None = None,
    kind: str = "both",
    size: tuple[int, int] = (1200, 800),
    loss_log: bool | None = None,
    figure: FigureSpec | None = None,
) -> Path:
    """Draw ``data`` and write it to ``path`` atomically (see the module docstring); returns ``path``.

    Raises :class:`ConfigError` for an unknown format or kind, or a path that cannot be written.
    """
    target = Path(path)
    if fmt is None:
        fmt = target.suffix.lower().lstrip(".")
        if not fmt:
            raise ConfigError(f"cannot tell the plot format of {target}: give png, svg or pdf")
    content = render_bytes(data, fmt, title=title, kind=kind, size=size, loss_log=loss_log, figure=figure)
    return atomic_write(target, content)


# --------------------------------------------------------------------------- the LR range test

_RT_RAW = "#56B4E9"
_RT_SMOOTH = "#0072B2"
_RT_BAND = "#009E73"
_RT_CHOSEN = "#D55E00"
_RT_METHODS = {"steepest": ("steepest", "#CC79A7"), "valley": ("valley", "#009E73"),
               "minimum_tenth": ("min / 10", "#E69F00"), "confirmed": ("confirmed", _RT_CHOSEN)}


class _RangeTestFigure(_OffscreenFigure):
    """The range test's curve, suggestion band and suggestion lines, ready to be painted."""

    def __init__(self, result: Any, *, title: str | None, size: tuple[int, int]):
        from lrviz.lab.rangetest import loss_axis_range

        super().__init__(size, spacing=0.4)
        base, pad, win = self.base, self.pad, self.win
        tick_px, label_px, title_px = round(base * 0.82), round(base * 0.95), round(base * 1.1)
        legend_px = round(base * 0.82)
        s = result.suggestions
        lrs = np.asarray(result.lrs, dtype=np.float64)
        losses = np.asarray(result.losses, dtype=np.float64)
        smoothed = np.asarray(result.smoothed, dtype=np.float64)

        row = 0
        lines = [title] if title else []
        if s.best is not None:
            lo, hi = s.band() or (s.best, s.best)
            lines.append(f"suggested learning rate {format_number(s.best)} ({_RT_METHODS[s.chosen][0]}) · band "
                         f"{format_number(lo)} – {format_number(hi)}")
        else:
            lines.append(f"no suggestion: {s.reason or 'the curve cannot be judged'}")
        done = len(lrs)
        lines.append(f"stopped: {result.stop_reason} ({done} of {result.steps} steps)" if result.stop_reason
                     else f"ran all {result.steps} steps from {format_number(result.start)} to {format_number(result.end)}")
        for k, text in enumerate(lines):
            bold = k == 0 and bool(title)
            px = title_px if bold else label_px
            font = _font(px, bold=bold)
            colour = _RT_CHOSEN if (k == 1 and s.best is None) else _TEXT
            label = win.addLabel(_wrap_title(text, font, self.width - 4 * pad), row=row, col=0,
                                 size=f"{px}px", color=colour, bold=bold)
            label.item.setFont(font)
            label.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)
            label.setMaximumHeight(round(px * 1.6))
            row += 1

        axes: dict[str, pg.AxisItem] = {"bottom": ValueAxis("bottom"), "left": ValueAxis("left")}
        plot = self._boxed_plot(row + 1, axes, tick_px)
        style = {"font-size": f"{label_px}px", "color": _TEXT}
        plot.setLabel("left", "training loss", **style)
        plot.setLabel("bottom", "learning rate (log scale)", **style)
        plot.setLogMode(x=True, y=False)
        self.plot = plot
        legend: list[tuple[Any, str]] = []
        good = np.isfinite(losses) & (lrs > 0)
        raw = pg.PlotDataItem(lrs[good], losses[good], pen=pg.mkPen(_color(_RT_RAW, 150), width=1.2), antialias=True)
        plot.addItem(raw)
        legend.append((raw, "loss per batch"))
        sgood = np.isfinite(smoothed) & (lrs > 0)
        smooth_item = pg.PlotDataItem(lrs[sgood], smoothed[sgood], pen=pg.mkPen(_RT_SMOOTH, width=2.4),
                                      antialias=True)
        plot.addItem(smooth_item)
        legend.append((smooth_item, f"smoothed (EMA {result.beta:g})"))
        if done:
            plot.setXRange(math.log10(float(lrs[0])), math.log10(float(lrs[-1])), padding=0.02)
        yr = loss_axis_range(losses, smoothed)  # the same range as the range-test panel
        if yr is not None:
            plot.setYRange(*yr, padding=0)
        band = s.band()
        if band is not None and s.best is not None:
            region = pg.LinearRegionItem(values=(math.log10(band[0]), math.log10(band[1])), movable=False,
                                         brush=pg.mkBrush(_color(_RT_BAND, 45)), pen=pg.mkPen(_color(_RT_BAND, 130)))
            region.setZValue(-10)
            plot.addItem(region, ignoreBounds=True)
            sample = pg.PlotDataItem([0], [0], pen=pg.mkPen(_color(_RT_BAND, 160), width=8))
            legend.append((sample, "suggestion band"))
            values = s.values()
            if s.confirmed is not None and s.confirmed not in values.values():  # a rate between them
                values["confirmed"] = s.confirmed
            span = (math.log10(float(lrs[0])), math.log10(float(lrs[-1]))) if done > 1 else (0.0, 1.0)
            order = sorted((m for m in values if values[m] is not None), key=lambda m: values[m])
            for k, m in enumerate(order):
                v = float(values[m])
                name, colour = _RT_METHODS[m]
                chosen = m == s.chosen or (s.chosen == "confirmed" and v == s.confirmed)
                if chosen:
                    colour = _RT_CHOSEN
                text = f"{name} {format_number(v)}" + (
                    " (confirmed)" if chosen and s.chosen == "confirmed" and m != "confirmed"
                    else " (chosen)" if chosen else "")
                right = span[1] > span[0] and (math.log10(v) - span[0]) / (span[1] - span[0]) > 0.55
                anchor = (1.04, 0.5) if right else (-0.04, 0.5)
                pen = pg.mkPen(colour, width=3.2 if chosen else 1.6,
                               style=Qt.PenStyle.SolidLine if chosen else Qt.PenStyle.DashLine)
                line = pg.InfiniteLine(pos=math.log10(v), angle=90, pen=pen, movable=False, label=text,
                                       labelOpts={"position": (0.93, 0.8, 0.67)[k % 3], "color": colour,
                                                  "fill": pg.mkBrush(255, 255, 255, 225),
                                                  "anchors": [anchor, anchor]})
                line.label.setFont(_font(round(base * 0.8), bold=chosen))
                line.setZValue(10 if chosen else 5)
                plot.addItem(line, ignoreBounds=True)
        self._add_legend(row, legend, legend_px)
        if not done:
            text = pg.TextItem("no steps recorded", color=_TEXT, anchor=(0.5, 0.5))
            text.setFont(_font(label_px))
            plot.addItem(text, ignoreBounds=True)
            plot.setRange(xRange=(0, 1), yRange=(0, 1))

    def _add_legend(self, row: int, legend: list[tuple[Any, str]], px: int) -> None:
        """One row of legend entries under the title, centred."""
        from pyqtgraph.graphicsItems.LegendItem import ItemSample

        font = _font(px)
        box = self.win.addLayout(row=row, col=0)
        box.setContentsMargins(0, 0, 0, 0)
        box.layout.setHorizontalSpacing(round(px * 0.4))
        box.addLabel("", row=0, col=0)
        for i, (item, name) in enumerate(legend):
            sample = ItemSample(item)
            sample.setFixedWidth(28)
            box.addItem(sample, row=0, col=1 + 2 * i)
            label = box.addLabel(html.escape(name), row=0, col=2 + 2 * i, color=_TEXT, size=f"{px}px",
                                 justify="left")
            label.item.setFont(font)
            label.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Preferred)
        box.addLabel("", row=0, col=2 * len(legend) + 1)
        box.layout.setColumnStretchFactor(0, 1)
        box.layout.setColumnStretchFactor(2 * len(legend) + 1, 1)
        box.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)
        box.setMaximumHeight(round(px * 1.9))

    def settle(self) -> None:
        self.win.show()
        app = QApplication.instance()
        for _ in range(4):
            app.processEvents()


def render_range_test(
    result: Any,
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    title: str | None = None,
    size: tuple[int, int] = (1200, 800),
) -> Path:
    """Draw an LR range test (:class:`lrviz.lab.rangetest.RangeTestResult`) and write it to ``path`` atomically.

    Loss per batch and smoothed loss against the learning rate on a log axis; the band between the
    suggestions shaded; each method's suggestion a labelled vertical line, the chosen one solid and
    highlighted; the suggestion (or why there is none) and the stop reason under the title.
    ``fmt`` is png, svg or pdf (default: the suffix of ``path``). Returns ``path``.
    """
    target = Path(path)
    if fmt is None:
        fmt = target.suffix.lower().lstrip(".")
        if not fmt:
            raise ConfigError(f"cannot tell the plot format of {target}: give png, svg or pdf")
    fmt = str(fmt).lower().lstrip(".")
    if fmt not in RENDER_FORMATS:
        raise ConfigError(f"unknown plot format {fmt!r}; choose png, svg or pdf")
    w, h = int(size[0]), int(size[1])
    if w < 200 or h < 150:
        raise ConfigError(f"a plot must be at least 200 x 150 pixels, not {w} x {h}")
    ensure_app()
    fig = _RangeTestFigure(result, title=title, size=(w, h))
    try:
        fig.settle()
        content = _encode(fig, fmt, w, h, title or "LR range test")
    finally:
        fig.close()
    return atomic_write(target, content)


# the core exports plots through this module without naming it (it never imports the Qt layer)
_export_module.use_plot_renderer(sys.modules[__name__])
