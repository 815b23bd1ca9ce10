"""The axes every lrviz plot uses: plain numbers, and always at least two labelled ticks.

pyqtgraph labels a log axis only at whole decades and at 1..9 times a decade, so a view over less
than a decade (a constant rate of 0.3, a loss from 2 to 3.3) can show a single label or none.
:func:`log_ticks` picks the labels instead, the first of these that puts at least two labels
inside the axis (away from its ends, where a label would be cut off) without crowding it:

1. 1, 2 and 5 times each decade (0.01, 0.02, 0.05, 0.1...);
2. whole decades only, every 1, 2, 5, 10... decades (long ranges);
3. every whole multiple of a decade (2, 3, 4...);
4. evenly spaced round values, as on a linear axis (0.28, 0.3, 0.32 on a log axis over 0.27..0.33).

A linear axis gets the same guarantee: when pyqtgraph's major ticks put fewer than two labels
inside the axis, the minor ticks are labelled too, and failing that a finer round spacing is used.
The rest of the ticks (1..9 times each decade, pyqtgraph's minor ticks) are drawn unlabelled.
"""

from __future__ import annotations

import html
import math
from typing import Any

import pyqtgraph as pg
from PySide6.QtGui import QFont, QFontMetricsF

from lrviz.export import plot_panel

from .widgets import format_number

__all__ = ["StepAxis", "ValueAxis", "linear_ticks", "log_ticks", "panel_axis", "step_text"]


_ALL_MULTIPLES = tuple(range(1, 10))
#: Room along the axis a label takes, in text heights (vertical axes) or in text heights too for
#: horizontal axes, whose labels are wider: a few characters ~ 3.5 heights.
_LABEL_EXTENT = {"left": 1.0, "right": 1.0, "bottom": 3.5, "top": 3.5}
#: A label is "inside" when its centre is at least this many label extents from either end.
_EDGE = 0.55
#: At most one label per this many label extents (more looks crowded).
_SPACING = 1.6


def _nice_floor(x: float) -> float:
    """The largest of 1, 2, 5 x 10^k not above ``x`` (``x`` > 0)."""
    p = 10.0 ** math.floor(math.log10(x))
    for m in (5.0, 2.0, 1.0):
        if m * p <= x * (1 + 1e-9):
            return m * p
    return p  # pragma: no cover - m = 1 always fits


def _digits(values: list[float], step: float) -> int:
    """Significant digits that tell ticks ``step`` apart (at least 2)."""
    top = max((abs(v) for v in values if v), default=abs(step) or 1.0)
    return max(2, math.floor(math.log10(top)) - math.floor(math.log10(step)) + 1)


def linear_ticks(lo: float, hi: float, min_count: int = 2, max_count: int = 0) -> tuple[list[float], float]:
    """Round values ``1, 2, 5 x 10^k`` apart inside ``lo..hi`` and their step: at least ``min_count``
    of them and, when ``max_count`` allows it, at most ``max_count``."""
    span = hi - lo
    if not (math.isfinite(lo) and math.isfinite(hi)) or span <= 0:
        return [], 0.0

    def at(step: float) -> list[float]:
        first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        return [0.0 if k == 0 else k * step for k in range(first, last + 1)]

    step = _nice_floor(span / (min_count + 1))
    values = at(step)
    while max_count and len(values) > max_count:
        wider = _nice_floor(step * 2.5)  # the next of 1, 2, 5 x 10^k
        if len(at(wider)) < min_count:
            break
        step, values = wider, at(wider)
    return values, step


def log_ticks(lo: float, hi: float, length_px: float, label_px: float) -> tuple[dict[float, str], list[float]]:
    """Ticks of a log axis showing ``10**lo .. 10**hi`` on ``length_px`` pixels.

    Returns the labelled ticks (position in log10 units -> text) and the unlabelled ones. Labels
    take ``label_px`` pixels along the axis; see the module docstring for the choice.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo or length_px <= 0:
        return {}, []
    per_px = (hi - lo) / length_px
    margin = _EDGE * label_px * per_px
    most = max(2, int(length_px / (_SPACING * label_px)))

    def inside(values: list[float]) -> int:
        return sum(lo + margin <= v <= hi - margin for v in values)

    d0, d1 = math.floor(lo), math.ceil(hi)
    multiples = [(d + math.log10(m), m) for d in range(d0, d1 + 1) for m in _ALL_MULTIPLES]
    multiples = [(v, m) for v, m in multiples if lo <= v <= hi]
    every_multiple = [v for v, _ in multiples]
    minor = every_multiple if len(multiples) <= length_px / 4 else []

    def texts(values: list[float], digits: int = 2) -> tuple[dict[float, str], list[float]]:
        return {v: format_number(10.0**v, digits) for v in values}, minor

    one_two_five = [v for v, m in multiples if m in (1, 2, 5)]
    if inside(one_two_five) >= 2 and len(one_two_five) <= most:
        return texts(one_two_five)
    decades = [float(d) for d in range(d0, d1 + 1) if lo <= d <= hi]
    if inside(decades) >= 2:
        every = 1
        while len(decades[::every]) > most:
            every = {1: 2, 2: 5}.get(every, every * 2)
        thinned = max((decades[k::every] for k in range(every)), key=inside)
        return texts(thinned if inside(thinned) >= 2 else decades)
    if inside(every_multiple) >= 2 and len(every_multiple) <= most:
        return texts(every_multiple)
    if hi - lo > 1.0:  # over a decade, yet crowded: 1, 2, 5 (or every multiple) all the same
        return texts(one_two_five if inside(one_two_five) >= 2 else every_multiple)
    # Less than a decade in view: round values as on a linear axis, placed on the log scale.
    values, step = linear_ticks(10.0 ** (lo + margin), 10.0 ** (hi - margin), 2, most)
    values = [v for v in values if v > 0]
    if len(values) < 2:  # too narrow to show two distinct round numbers
        return texts([lo + margin, hi - margin], 6)
    digits = _digits(values, step)
    return {math.log10(v): format_number(v, digits) for v in values}, minor


def step_text(v: float) -> str:
    """A step number without scientific notation: ``950``, ``12k``, ``1.5M``."""
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:g}M"
    if a >= 1e4:
        return f"{v / 1e3:g}k"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:g}"


class ValueAxis(pg.AxisItem):
    """An axis with plain numbers (no SI-prefix rescaling) and at least two labelled ticks.

    In log mode the ticks come from :func:`log_ticks`; in linear mode from pyqtgraph, with its
    minor ticks labelled too (or a finer spacing) when the major ones leave fewer than two labels.
    """

    def __init__(self, orientation: str = "left", **kw: Any):
        super().__init__(orientation, **kw)
        self.enableAutoSIPrefix(False)
        self._labels: dict[float, str] = {}
        #: Shorter forms of the axis title, tried in order when the axis is too short for it.
        self.short_titles: tuple[str, ...] = ()

    # ---- the axis title: elided to the axis' length, so a short plot's titles never run into the next
    def _updateLabel(self) -> None:  # noqa: N802
        super()._updateLabel()
        self._fit_label()
        super().resizeEvent()

    def resizeEvent(self, ev: Any = None) -> None:  # noqa: N802
        self._fit_label()
        super().resizeEvent(ev)

    def _fit_label(self) -> None:
        label = self.label
        if label is None or not self.labelText:
            return
        size = self.size()
        length = size.height() if self.orientation in ("left", "right") else size.width()
        label.setHtml(self.labelString())
        label.setToolTip("")
        if length <= 0 or label.boundingRect().width() <= length:
            return
        style = ";".join(f"{k}: {v}" for k, v in self.labelStyle.items())
        text = str(self.labelText)
        label.setToolTip(text)
        for short in self.short_titles:  # "LR" for "learning rate"...
            label.setHtml(f"<span style='{style}'>{html.escape(short)}</span>")
            if label.boundingRect().width() <= length:
                return
            text = short
        for k in range(len(text) - 1, 0, -1):  # ... and "gra…" when even that does not fit
            label.setHtml(f"<span style='{style}'>{html.escape(text[:k].rstrip())}…</span>")
            if label.boundingRect().width() <= length:
                break

    def shown_label(self) -> str:
        """The axis title as drawn (elided when the axis is too short for it)."""
        return self.label.toPlainText() if self.label is not None and self.label.isVisible() else ""

    def _label_px(self) -> float:
        font = self.style.get("tickFont") or QFont()
        return QFontMetricsF(font).height() * _LABEL_EXTENT.get(self.orientation, 1.0)

    def tickValues(self, minVal: float, maxVal: float, size: float) -> list:  # noqa: N802, N803
        lo, hi = sorted((float(minVal), float(maxVal)))
        if self.logMode:
            labels, minor = log_ticks(lo, hi, size, self._label_px())
            self._labels = {round(v, 9): t for v, t in labels.items()}
            levels = [(None, sorted(labels))]
            if minor:
                levels.append((None, [v for v in minor if round(v, 9) not in self._labels]))
            return levels
        levels = super().tickValues(minVal, maxVal, size)
        if not levels or hi <= lo:
            return levels
        margin = _EDGE * self._label_px() * (hi - lo) / max(size, 1.0)

        def inside(values: list[float]) -> int:
            return sum(lo + margin <= v <= hi - margin for v in values)

        major = list(levels[0][1])
        if inside(major) >= 2:
            return levels
        if len(levels) > 1 and inside(major + list(levels[1][1])) >= 2:
            merged = sorted(major + list(levels[1][1]))
            return [(levels[1][0], merged), *levels[2:]]
        values, step = linear_ticks(lo + margin, hi - margin, 2, max(2, int(size / (_SPACING * self._label_px()))))
        return [(step, values)] if len(values) >= 2 else levels

    def tickStrings(self, values: list[float], scale: float, spacing: float) -> list[str]:  # noqa: N802
        if self.logMode:
            return [self._labels.get(round(float(v), 9), "") for v in values]
        finite = [v for v in values if math.isfinite(v)]
        top = max((abs(v) for v in finite), default=0.0)
        if top >= 1e5 or (spacing and spacing < 1e-3 * top):  # big values, or fine steps between them
            digits = max(3, _digits(finite, spacing)) if spacing else 3
            return [format_number(v, digits) for v in values]
        return super().tickStrings(values, scale, spacing)


class StepAxis(ValueAxis):
    """Step ticks without scientific notation: 950, 12k, 1.5M."""

    def tickStrings(self, values: list[float], scale: float, spacing: float) -> list[str]:  # noqa: N802
        return [step_text(v * scale) for v in values]


def panel_axis(panel: str) -> ValueAxis:
    """The left axis of a run-plot panel (``loss``, ``lr``, ``grad``, ``acc``), knowing its short titles;
    set its title with ``plot.setLabel("left", plot_panel(panel).title)`` (:data:`lrviz.export.PLOT_PANELS`)."""
    axis = ValueAxis("left")
    axis.short_titles = plot_panel(panel).short
    return axis
