"""The run browser's table: one row per stored run (id, name, script, status, steps, best and final
loss, start, duration), sorted by each column's natural value and filtered on every column's text."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from PySide6.QtCore import (
    QAbstractTableModel,
    QModelIndex,
    QPersistentModelIndex,
    QSortFilterProxyModel,
    Qt,
)
from PySide6.QtGui import QBrush, QColor, QFont
from PySide6.QtWidgets import QApplication, QStyle

from lrviz.errors import ConfigError
from lrviz.states import LIVE_STATES

COLUMNS = ("#", "Name", "Script", "Status", "Steps", "Best loss", "Final loss", "Started", "Duration")
COL_ID, COL_NAME, COL_SCRIPT, COL_STATUS, COL_STEPS, COL_BEST, COL_FINAL, COL_STARTED, COL_DURATION = range(9)
#: Role giving the run id of a row (any column).
RUN_ID_ROLE = Qt.ItemDataRole.UserRole + 1
ACTIVE_STATUSES = tuple(str(s) for s in LIVE_STATES)
_STATUS_TIPS = {
    "created": "Created, not started yet.",
    "running": "Training now (in this window or another lrviz process).",
    "paused": "Paused; resume it in the window or process that runs it.",
    "finished": "Trained the steps or epochs asked for.",
    "stopped": "Stopped by hand before the end.",
    "diverged": "Stopped because the loss or the gradients became non-finite or exploded.",
    "failed": "Stopped by an error in the script or a setting.",
    "interrupted": (
        "The process running this run ended without finishing it (a crash, a kill or a power cut). "
        "The steps saved until then (all but the last second or so) are kept."
    ),
}


def read_only_reason(info: Any) -> str | None:
    """Why a run cannot be watched, steered, resumed or forked (imported from another tool's logs), or None."""
    if not getattr(info, "read_only", False):
        return None
    try:
        info.require_trainable("watched, steered, resumed or forked")
    except ConfigError as exc:
        return str(exc)
    return None


_STATUS_COLOURS = {
    "interrupted": "#B35900",
    "failed": "#C00000",
    "diverged": "#C00000",
    "running": "#007A3D",
    "paused": "#0060A8",
}
_MISSING = "—"


def format_loss(value: float | None) -> str:
    """A loss with 4 significant digits; an em dash when there is none."""
    if value is None or not isinstance(value, (int, float)):
        return _MISSING
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def format_duration(seconds: float | None) -> str:
    """``"45.2 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``, ``"3 d 4 h"``; an em dash when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return _MISSING
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def _started(info: Any) -> float | None:
    return info.started_at if info.started_at is not None else info.created_at


def _duration(info: Any, now: float | None = None) -> float | None:
    if info.started_at is None:
        return None
    end = info.ended_at
    if end is None:
        if info.status not in ACTIVE_STATUSES:
            return None
        end = time.time() if now is None else now
    return max(0.0, end - info.started_at)


def _local_time(t: float | None) -> str:
    if t is None:
        return _MISSING
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


class RunTableModel(QAbstractTableModel):
    """The store's runs (``RunInfo`` objects), one row each; the Name column is editable.

    Renaming goes through ``rename_handler(run_id, name) -> bool`` (set by the browser); the
    model changes its row only when that returns True.
    """

    def __init__(self, parent: Any = None):
        super().__init__(parent)
        self._runs: list[Any] = []
        self.live: set[int] = set()
        self.rename_handler: Callable[[int, str], bool] | None = None

    # ---- contents ----

    def set_runs(self, runs: Sequence[Any], live: Iterable[int] = ()) -> None:
        """Replace every row; ``live``: the ids of the runs served live now."""
        self.beginResetModel()
        self._runs = list(runs)
        self.live = set(live)
        self.endResetModel()

    def runs(self) -> list[Any]:
        """The runs, in store order (not the view's)."""
        return list(self._runs)

    def run_at(self, row: int) -> Any:
        return self._runs[row]

    def row_of(self, run_id: int) -> int | None:
        for i, info in enumerate(self._runs):
            if info.id == run_id:
                return i
        return None

    def sort_key(self, row: int, column: int) -> Any:
        """The value a column sorts by (None sorts last either way)."""
        info = self._runs[row]
        if column == COL_ID:
            return info.id
        if column == COL_NAME:
            return (info.name or "").casefold()
        if column == COL_SCRIPT:
            return Path(info.script_path or "").name.casefold()
        if column == COL_STATUS:
            return info.status
        if column == COL_STEPS:
            return info.steps
        if column == COL_BEST:
            return info.best_loss
        if column == COL_FINAL:
            return info.final_loss
        if column == COL_STARTED:
            return _started(info)
        if column == COL_DURATION:
            return _duration(info)
        return None

    # ---- Qt model ----

    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:  # noqa: B008, N802
        return 0 if parent.isValid() else len(self._runs)

    def columnCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:  # noqa: B008, N802
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:  # noqa: N802
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole and 0 <= section < len(COLUMNS):
            return COLUMNS[section]
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.ToolTipRole:
            return {
                COL_ID: "Run id (use it with `lrviz export ID`)",
                COL_NAME: "Run name (F2 or Rename to change it)",
                COL_BEST: "Lowest finite training loss of a batch",
                COL_FINAL: "Last finite training loss of a batch",
                COL_STARTED: "When training started (local time)",
            }.get(section)
        return None

    def flags(self, index: QModelIndex | QPersistentModelIndex) -> Qt.ItemFlag:
        base = super().flags(index)
        if index.isValid() and index.column() == COL_NAME:
            return base | Qt.ItemFlag.ItemIsEditable
        return base

    def data(self, index: QModelIndex | QPersistentModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or not 0 <= index.row() < len(self._runs):
            return None
        info = self._runs[index.row()]
        col = index.column()
        if role == RUN_ID_ROLE:
            return info.id
        if role in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.EditRole):
            text = self._text(info, col, role)
            if col == COL_STATUS and info.id in self.live:
                return f"{text} · live"
            return f"{text} · imported" if col == COL_STATUS and getattr(info, "read_only", False) else text
        if role == Qt.ItemDataRole.ToolTipRole:
            tip = self._tooltip(info, col)
            if col == COL_STATUS and info.id in self.live:
                tip = f"{tip}\n\nServed live now: Watch (or double-click) follows it and steers it."
            return tip
        if role == Qt.ItemDataRole.TextAlignmentRole:
            if col in (COL_ID, COL_STEPS, COL_BEST, COL_FINAL, COL_DURATION):
                return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            return None
        if role == Qt.ItemDataRole.ForegroundRole and col == COL_STATUS:
            colour = _STATUS_COLOURS.get(info.status)
            return QBrush(QColor(colour)) if colour else None
        if role == Qt.ItemDataRole.FontRole and col == COL_STATUS and info.status in (
            "interrupted", "running", "paused"
        ):
            font = QFont()
            font.setBold(True)
            return font
        if role == Qt.ItemDataRole.DecorationRole and col == COL_STATUS:
            return self._status_icon(info.status)
        return None

    def setData(self, index: QModelIndex | QPersistentModelIndex, value: Any, role: int = Qt.ItemDataRole.EditRole) -> bool:  # noqa: N802
        if role != Qt.ItemDataRole.EditRole or not index.isValid() or index.column() != COL_NAME:
            return False
        info = self._runs[index.row()]
        name = str(value).strip()
        if name == info.name:
            return False
        if self.rename_handler is None or not self.rename_handler(info.id, name):
            return False
        info.name = name
        self.dataChanged.emit(index, index, [Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.EditRole])
        return True

    # ---- cells ----

    @staticmethod
    def _text(info: Any, col: int, role: int) -> Any:
        if col == COL_ID:
            return str(info.id)
        if col == COL_NAME:
            return info.name
        if col == COL_SCRIPT:
            return Path(info.script_path or "").name or _MISSING
        if col == COL_STATUS:
            return info.status
        if col == COL_STEPS:
            return f"{info.steps:,}".replace(",", "\u202f") if info.steps is not None else _MISSING
        if col == COL_BEST:
            return format_loss(info.best_loss)
        if col == COL_FINAL:
            return format_loss(info.final_loss)
        if col == COL_STARTED:
            return _local_time(_started(info))
        if col == COL_DURATION:
            text = format_duration(_duration(info))
            return f"{text} …" if info.status in ACTIVE_STATUSES and text != _MISSING else text
        return None

    @staticmethod
    def _tooltip(info: Any, col: int) -> str | None:
        if col == COL_SCRIPT:
            return info.script_path or None
        if col == COL_STATUS:
            tip = _STATUS_TIPS.get(info.status, info.status)
            if info.error:
                tip += f"\n\n{info.error}"
            reason = read_only_reason(info)
            return f"{tip}\n\nImported: {reason}." if reason else tip
        if col == COL_NAME:
            tip = f"Run {info.id}: {info.name}"
            if info.parent_id is not None:
                tip += f"\nForked from run {info.parent_id} at step {info.fork_step}"
            if info.device:
                tip += f"\nDevice: {info.device}"
            return tip
        if col == COL_STARTED:
            t = _started(info)
            if t is None:
                return None
            label = "Started" if info.started_at is not None else "Created (not started)"
            return f"{label} {datetime.fromtimestamp(t).astimezone().isoformat(sep=' ', timespec='seconds')}"
        if col == COL_DURATION and info.status in ACTIVE_STATUSES:
            return "Still running: the duration so far (updated on Refresh)"
        return None

    @staticmethod
    def _status_icon(status: str) -> Any:
        style = QApplication.style()
        if style is None:
            return None
        if status == "interrupted":
            return style.standardIcon(QStyle.StandardPixmap.SP_MessageBoxWarning)
        if status in ("failed", "diverged"):
            return style.standardIcon(QStyle.StandardPixmap.SP_MessageBoxCritical)
        return None


class RunSortProxy(QSortFilterProxyModel):
    """Sorts by each column's natural value (numbers as numbers), missing values last; filters
    on the text of every column."""

    def lessThan(self, left: QModelIndex | QPersistentModelIndex, right: QModelIndex | QPersistentModelIndex) -> bool:  # noqa: N802
        model = self.sourceModel()
        a = model.sort_key(left.row(), left.column())
        b = model.sort_key(right.row(), right.column())
        if a is None or b is None:
            if a is None and b is None:
                return model.run_at(left.row()).id < model.run_at(right.row()).id
            # Missing last in either order: "less" means "before" only when ascending.
            ascending = self.sortOrder() == Qt.SortOrder.AscendingOrder
            return (b is None) if ascending else (a is None)
        if isinstance(a, float) and math.isnan(a):
            a = math.inf
        if isinstance(b, float) and math.isnan(b):
            b = math.inf
        if a == b:
            return model.run_at(left.row()).id < model.run_at(right.row()).id
        return a < b


