"""Shared pieces of the learning-rate lab panels: the panel base class, axes, colours, and the
answers of commands sent to runs, handed to the GUI thread.

Nothing here talks to the main window; the panels reach the app through :class:`lrviz.ui.lab.panels.Lab`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyqtgraph as pg
from PySide6.QtCore import QEvent, Qt
from PySide6.QtWidgets import (
    QFormLayout,
    QFrame,
    QLabel,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from lrviz.errors import LrvizError
from lrviz.states import is_terminal

from .. import theme
from ..axes import ValueAxis
from ..futures import GuiFutures
from ..widgets import form_layout, format_number

if TYPE_CHECKING:
    from lrviz.live.run import Run
    from lrviz.scriptinfo import ScriptInfo

    from .panels import Lab

#: Colours of runs drawn side by side in a lab panel (Okabe-Ito, no yellow).
RUN_COLOURS = (theme.BLUE, theme.ORANGE, theme.GREEN, theme.PURPLE, theme.BLACK, theme.VERMILLION,
               theme.SKY_BLUE)


# ---- small widgets ------------------------------------------------------------------------------
def form() -> QFormLayout:
    """A compact form layout like the control panel's, a little tighter."""
    return form_layout((4, 2), 3)


def push_button(text: str, name: str, tip: str = "") -> QPushButton:
    """A panel's button: object name ``name``, tooltip ``tip``, never the default button."""
    b = QPushButton(text)
    b.setObjectName(name)
    if tip:
        b.setToolTip(tip)
    b.setAutoDefault(False)
    return b


def note_label(text: str = "", colour: str = theme.GREY, name: str = "") -> QLabel:
    """A word-wrapped, selectable label for explanations and results (object name ``name``)."""
    lab = QLabel(text)
    if name:
        lab.setObjectName(name)
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


# ---- the panel ---------------------------------------------------------------------------------------
class LabPanel(QWidget):
    """A lab panel: built as ``cls(lab)`` from :data:`lrviz.ui.lab.panels.PANELS`, shown in a dock, and told
    what happens by the lab. Every method has a default, so a panel overrides only what it needs.

    ``tick(run)`` is called by the window's redraw timer (at most 30 times a second) with the run the
    window shows (or None): draw what is new since the last tick, cheaply when nothing is.
    """

    def __init__(self, lab: Lab, parent: QWidget | None = None):
        super().__init__(parent)
        self.lab = lab

    def tick(self, run: Run | None) -> None:
        """Redraw what changed (called every frame)."""

    def busy(self) -> bool:
        """Whether the panel has work of its own running (a range test, a sweep)."""
        return False

    def run_changed(self, run: Run | None) -> None:
        """The window shows another run (or none), or the run it shows has ended."""

    def script_changed(self, info: ScriptInfo | None) -> None:
        """Another script was loaded (or the same one again)."""

    def shutdown(self, timeout: float) -> None:
        """The window closes: stop what the panel started, waiting at most ``timeout`` seconds."""


def is_live(run: Run | None) -> bool:
    """Whether ``run`` can still take commands (it has not ended)."""
    return run is not None and not run.done.is_set() and not is_terminal(run.state)


# ---- answers of commands -------------------------------------------------------------------------------
class Answers(GuiFutures):
    """Answers of commands sent to runs, handed to the GUI thread (never called from another thread):
    ``add(fut, then, refused)`` calls ``then(ack)``, or ``refused(reason)`` when the run refused the
    command or could not take it."""

    def add(self, fut: Future, then: Callable[[dict[str, Any]], None],
            refused: Callable[[str], None] | None = None) -> Future:
        def answered(f: Future) -> None:
            exc = LrvizError("cancelled") if f.cancelled() else f.exception()
            if exc is None:
                then(f.result())
            elif refused is not None:
                refused(str(exc) or type(exc).__name__)

        self.when_done(fut, answered)
        return fut

    def __bool__(self) -> bool:
        """Whether an answer is still to come."""
        return self.pending > 0


def surface_for(info: ScriptInfo | None, run: Run | None = None,
                params: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The sampled 2-D surface (see :meth:`lrviz.scriptinfo.ScriptInfo.surface`) to draw: that of
    ``run``'s knobs when it is a run of the script ``info`` describes, else of ``params``."""
    if info is None:
        return None
    if run is not None:
        if not same_script(run.script_path, info.path):
            return None
        params = dict((run.config or {}).get("params") or {})
    return info.surface(params)


def same_script(a: str | Path | None, b: str | Path | None) -> bool:
    """Whether two script paths name the same file."""
    if not a or not b:
        return False
    return _resolved(str(a)) == _resolved(str(b))


@functools.lru_cache(maxsize=64)
def _resolved(path: str) -> str:
    """``path`` made absolute, links resolved: once per path (the panels ask every frame)."""
    try:
        return str(Path(path).resolve())
    except OSError:
        return path
