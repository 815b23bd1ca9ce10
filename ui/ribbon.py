"""The strip above the plots that holds the event markers' labels, laid out so that none collide.

The rule (:func:`place_labels`): labels sit in one of a few rows, each starting just right of its
marker line (or ending just left of it, where it would run past the right edge); a label goes in
the first row with room for it. Markers a few pixels apart share one label, their texts joined
(``lr 2 · diverged · paused``) or, when that does not fit, counted (``3 events``), with every
event in its tooltip. When labels still do not fit, markers further apart are merged, until they
do. So no two labels overlap and none is cut off at an edge, at any zoom: the layout is redone
whenever the step range or the width changes.

The live plots and the exported figures use the same :class:`EventRibbon`.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyqtgraph as pg
from PySide6.QtGui import QFont

from lrviz.export import Marker

from .axes import ValueAxis

__all__ = ["EventRibbon", "Placed", "place_labels"]

#: Markers closer than this (pixels) share a label from the start.
MERGE_PX = 6.0
#: Pixels between a marker line and its label, and between two labels in a row.
GAP_PX = 3.0
ROW_GAP_PX = 8.0


@dataclass
class Placed:
    """A label as laid out: the markers it stands for (indices), its text and where it goes."""

    members: list[int]
    text: str
    left: float  # pixels from the left edge of the strip
    width: float
    row: int


def _clusters(order: list[int], positions: Sequence[float], merge: float) -> list[list[int]]:
    out: list[list[int]] = []
    for i in order:
        if out and positions[i] - positions[out[-1][0]] <= merge:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def place_labels(positions: Sequence[float], texts: Sequence[str], width_of: Callable[[str], float],
                 view_width: float, rows: int = 2) -> list[Placed]:
    """Lay out the labels of markers at ``positions`` (pixels from the left of a strip
    ``view_width`` wide); markers outside the strip get none. See the module docstring."""
    order = sorted((i for i, p in enumerate(positions) if 0 <= p <= view_width), key=lambda i: positions[i])
    if not order:
        return []
    merge = MERGE_PX
    while True:
        clusters = _clusters(order, positions, merge)
        placed = _try_place(clusters, positions, texts, width_of, view_width, rows, force=len(clusters) == 1)
        if placed is not None:
            return placed
        merge *= 2


def _try_place(clusters: list[list[int]], positions: Sequence[float], texts: Sequence[str],
               width_of: Callable[[str], float], view_width: float, rows: int, force: bool) -> list[Placed] | None:
    ends = [-float("inf")] * rows
    out: list[Placed] = []
    for members in clusters:
        pos = positions[members[0]]
        joined = " · ".join(dict.fromkeys(texts[i] for i in members))
        candidates = [joined] if len(members) == 1 else [joined, f"{len(members)} events"]
        for k, text in enumerate(candidates):
            w = width_of(text)
            left = pos + GAP_PX if pos + GAP_PX + w <= view_width else pos - GAP_PX - w
            left = max(0.0, min(left, view_width - w))
            row = next((r for r in range(rows) if ends[r] + ROW_GAP_PX <= left), None)
            if row is None and force and k == len(candidates) - 1:
                row = 0
            if row is not None:
                ends[row] = left + w
                out.append(Placed(members, text, left, w, row))
                break
        else:
            return None
    return out


class EventRibbon(pg.PlotItem):
    """A thin plot above the others (share its step axis with them) holding the markers' labels."""

    def __init__(self, rows: int = 2, row_px: int = 18, axis_width: int = 64, font: QFont | None = None):
        super().__init__(axisItems={"left": ValueAxis("left")})
        self.rows = rows
        self.font = font
        self.hideAxis("bottom")
        ax = self.getAxis("left")
        ax.setWidth(axis_width)
        ax.setStyle(showValues=False, tickLength=0)
        ax.setTicks([[], []])  # no ticks (zero-length ticks still paint a dotted line)
        ax.setPen(pg.mkPen(None))
        self.setMenuEnabled(False)
        self.hideButtons()
        vb = self.getViewBox()
        vb.setMouseEnabled(x=True, y=False)
        vb.setYRange(0, rows, padding=0)
        vb.enableAutoRange(x=False, y=False)
        vb.setDefaultPadding(0)
        self.setMaximumHeight(row_px * rows + 6)
        self.setMinimumHeight(row_px * rows + 6)
        self._markers: list[tuple[Marker, str]] = []  # (marker, colour)
        self._items: list[pg.TextItem] = []
        self.placed: list[Placed] = []
        self._widths: dict[str, float] = {}
        self._layout_key: tuple | None = None
        vb.sigXRangeChanged.connect(self.relayout)
        vb.sigResized.connect(self.relayout)

    def set_markers(self, markers: Sequence[tuple[Marker, str]]) -> None:
        """Show these markers' labels (each with its colour), replacing the ones before."""
        self._markers = list(markers)
        self._layout_key = None
        self.relayout()

    def _width_of(self, text: str) -> float:
        w = self._widths.get(text)
        if w is None:
            probe = self._item(0)
            probe.setText(text)
            w = self._widths[text] = float(probe.boundingRect().width())
        return w

    def _item(self, k: int) -> pg.TextItem:
        while len(self._items) <= k:
            item = pg.TextItem("", anchor=(0, 0.5))
            item.textItem.document().setDocumentMargin(1)  # the text's own box: rows stay apart
            if self.font is not None:
                item.setFont(self.font)
            item.setVisible(False)
            self.addItem(item, ignoreBounds=True)
            self._items.append(item)
        return self._items[k]

    def relayout(self, *_: object) -> None:
        """Place the labels for the step range and width shown now (no-op when neither changed)."""
        vb = self.getViewBox()
        (x0, x1), width = vb.viewRange()[0], float(vb.width())
        key = (x0, x1, width, len(self._markers))
        if key == self._layout_key:
            return
        self._layout_key = key
        span = (x1 - x0) or 1.0
        positions = [(m.step - x0) / span * width for m, _ in self._markers]
        texts = [m.text for m, _ in self._markers]
        self.placed = place_labels(positions, texts, self._width_of, width, self.rows) if width > 0 else []
        for k, p in enumerate(self.placed):
            members = [self._markers[i] for i in p.members]
            alarm = next((c for m, c in members if m.alarm), None)
            item = self._item(k)
            item.setText(p.text)
            item.setColor(alarm or members[0][1])
            item.setToolTip("<br>".join(f"step {m.step:,}: {html.escape(m.text)}" for m, _ in members))
            item.setPos(x0 + (p.left / width) * span, self.rows - 0.5 - p.row)
            item.setVisible(True)
        for item in self._items[len(self.placed):]:
            item.setVisible(False)

    def labels(self) -> list[pg.TextItem]:
        """The labels shown now, in step order."""
        return [item for item in self._items[:len(self.placed)]]
