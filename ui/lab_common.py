"""Shared pieces of the learning-rate lab panels: axes, colours, a background worker, slow motion.

Nothing here talks to the main window; the panels reach the app through :class:`lrviz.ui.lab.Lab`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyqtgraph as pg
from PySide6.QtCore import QEvent, Qt
from PySide6.QtWidgets import QFormLayout, QFrame, QLabel, QScrollArea, QSizePolicy, QVBoxLayout, QWidget

from . import (
    _compat,  # noqa: F401  (must run first: PySide6 6.12 signal refcount defect)
    theme,
)
from .axes import ValueAxis
from .widgets import format_number

if TYPE_CHECKING:
    from lrviz.experiment import Experiment

#: Engine states after which the engine thread has ended (or is about to).
TERMINAL = ("finished", "stopped", "diverged", "failed")
#: Colours of runs drawn side by side in a lab panel (Okabe-Ito, no yellow).
RUN_COLOURS = (theme.BLUE, theme.ORANGE, theme.GREEN, theme.PURPLE, theme.BLACK, theme.VERMILLION,
               theme.SKY_BLUE)


# ---- small widgets ------------------------------------------------------------------------------
def form() -> QFormLayout:
    """A compact form layout like the control panel's."""
    f = QFormLayout()
    f.setContentsMargins(4, 2, 4, 2)
    f.setHorizontalSpacing(8)
    f.setVerticalSpacing(3)
    f.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    f.setLabelAlignment(Qt.AlignmentFlag.AlignRight)
    return f


def note_label(text: str = "", colour: str = theme.GREY) -> QLabel:
    """A word-wrapped, selectable label for explanations and results."""
    lab = QLabel(text)
    lab.setWordWrap(True)
    lab.setTextFormat(Qt.TextFormat.RichText)
    lab.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    lab.setStyleSheet(f"color: {colour};")
    lab.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    return lab


class _FitScrollArea(QScrollArea):
    """A scroll area whose content fills its height, and scrolls only when the content's minimum
    height (at the width it has, word-wrapped labels included) is more than that."""

    def __init__(self, parent: QWidget):
        super().__init__(parent)
        self.setWidgetResizable(False)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

    def setWidget(self, widget: QWidget) -> None:  # noqa: N802
        super().setWidget(widget)
        widget.installEventFilter(self)

    def eventFilter(self, obj: Any, event: QEvent) -> bool:  # noqa: N802
        if obj is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self._fit()
        return super().eventFilter(obj, event)

    def resizeEvent(self, event: Any) -> None:  # noqa: N802
        super().resizeEvent(event)
        self._fit()

    def _fit(self) -> None:
        inner = self.widget()
        layout = inner.layout() if inner is not None else None
        if layout is None:
            return
        width = self.viewport().width()
        if self.verticalScrollBar().isVisible():
            width = self.width() - self.frameWidth() * 2
        need = layout.minimumHeightForWidth(width) if layout.hasHeightForWidth() else layout.minimumSize().height()
        scroll = need > self.height()
        if scroll:
            width = self.width() - self.verticalScrollBar().sizeHint().width()
            need = layout.minimumHeightForWidth(width) if layout.hasHeightForWidth() else need
        inner.resize(width, max(need, self.height() if not scroll else need))


def scroll_column(panel: QWidget) -> QVBoxLayout:
    """The column layout of a panel whose content scrolls when its dock is too short for it, so
    labels, legends and plots keep their sizes instead of being drawn over one another; with room
    to spare, the content fills the dock."""
    outer = QVBoxLayout(panel)
    outer.setContentsMargins(0, 0, 0, 0)
    area = _FitScrollArea(panel)
    area.setObjectName(f"{panel.objectName() or 'panel'}Scroll")
    inner = QWidget()
    column = QVBoxLayout(inner)
    area.setWidget(inner)
    outer.addWidget(area)
    return column


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a table or a label; an em dash for None."""
    if x is None:
        return "—"
    return format_number(float(x), digits)


# ---- axes ---------------------------------------------------------------------------------------------
def lab_plot(bottom: str, left: str, *, log_x: bool = False, log_y: bool = False,
             min_height: int = 170) -> pg.PlotWidget:
    """A plot widget in the app's style: white, grid, plain-number axes, labelled."""
    theme.configure_pyqtgraph()
    w = pg.PlotWidget(axisItems={"bottom": ValueAxis("bottom"), "left": ValueAxis("left")})
    p = w.getPlotItem()
    p.showGrid(x=True, y=True, alpha=theme.GRID_ALPHA)
    p.setLabel("bottom", bottom)
    p.setLabel("left", left)
    p.getAxis("left").setWidth(52)
    p.setLogMode(x=log_x, y=log_y)
    p.setMenuEnabled(False)
    w.setMinimumHeight(min_height)
    return w


def add_legend(plot: pg.PlotWidget, corner: str = "top-right") -> pg.LegendItem:
    """A legend in a ``corner`` of the plot: 'top-left', 'top-right', 'bottom-left' or 'bottom-right'."""
    offset = (-6 if corner.endswith("right") else 6, -6 if corner.startswith("bottom") else 6)
    leg = plot.getPlotItem().addLegend(offset=offset, labelTextSize="8pt")
    leg.setBrush(pg.mkBrush(255, 255, 255, 215))
    leg.setPen(pg.mkPen(200, 200, 200))
    return leg


# ---- a background job ------------------------------------------------------------------------------
class Worker:
    """Runs ``fn(should_stop)`` in a daemon ``threading.Thread``; the GUI polls ``done``/``result``/``error``.

    Nothing is called back into Qt: the panel's timer reads the outcome on the GUI thread.
    """

    def __init__(self, name: str, fn: Callable[[Callable[[], bool]], Any]):
        self._fn = fn
        self._cancel = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self._fn(self._cancel.is_set)
        except BaseException as exc:  # handed to the GUI thread as a message
            self.error = exc

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return not self.thread.is_alive() and self.thread.ident is not None

    def join(self, timeout: float | None = None) -> bool:
        if self.thread.ident is None:
            return True
        self.thread.join(timeout)
        return not self.thread.is_alive()


def surface_of(exp: Experiment | None, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The 2-D surface a script describes (``SURFACES[params['surface']]`` when that knob is set,
    else ``SURFACE``), or None when it has none or no ``probe``."""
    if exp is None or not callable(getattr(exp.module, "probe", None)):
        return None
    surfaces = getattr(exp.module, "SURFACES", None)
    merged = dict(exp.params)
    merged.update(params or {})
    name = merged.get("surface")
    if isinstance(surfaces, dict) and name in surfaces:
        surface = surfaces[name]
    else:
        surface = getattr(exp.module, "SURFACE", None)
    if not isinstance(surface, dict) or not callable(surface.get("fn")):
        return None
    return surface


def param_choices(exp: Experiment | None) -> dict[str, tuple[str, ...]]:
    """The script's ``PARAM_CHOICES`` (knob name -> allowed values), checked; {} when absent."""
    raw = getattr(exp.module, "PARAM_CHOICES", None) if exp is not None else None
    if not isinstance(raw, dict):
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for k, v in raw.items():
        if isinstance(k, str) and isinstance(v, (list, tuple)) and v:
            out[k] = tuple(v)
    return out
