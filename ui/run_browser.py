"""The run browser: a sortable table of every run in the store, to open, watch, overlay, rename and delete.

``RunBrowser(store)`` lists ``store.list_runs()``: id, name, script, status, steps, best and final
loss, start time (local) and duration. Runs a crash left behind show as *interrupted* (warning icon,
explanation in the tooltip). The main window connects :attr:`RunBrowser.openRequested` (one run id:
double-click, Return or Open) and :attr:`RunBrowser.overlayRequested` (a list of ids: Overlay, two
or more selected), and calls :meth:`RunBrowser.refresh` when a run ends.

Runs served live now (any ``lrviz run`` on the same store, or a run of this app) say so in their
status (``running · live``); Watch (or double-click on one) emits :attr:`RunBrowser.watchRequested`.

Rename edits the name in place (F2, or the Rename button) and stores it with ``store.rename_run``;
Delete asks for confirmation naming the runs, then calls ``store.delete_run``. A run still running
or paused cannot be deleted. Errors from the store are shown in a message box, never raised.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from PySide6.QtCore import (
    QEvent,
    QItemSelection,
    QItemSelectionModel,
    QModelIndex,
    QObject,
    Qt,
    Signal,
)
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLineEdit,
    QMenu,
    QMessageBox,
    QPushButton,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from lrviz.errors import LrvizError
from lrviz.live.connection import live_runs

from .run_table import (  # noqa: F401  (the table's names, where the browser's users look for them)
    ACTIVE_STATUSES,
    COL_BEST,
    COL_DURATION,
    COL_FINAL,
    COL_ID,
    COL_NAME,
    COL_SCRIPT,
    COL_STARTED,
    COL_STATUS,
    COL_STEPS,
    COLUMNS,
    RUN_ID_ROLE,
    RunSortProxy,
    RunTableModel,
    format_duration,
    format_loss,
    read_only_reason,
)
from .widgets import ElidedLabel

__all__ = ["COLUMNS", "RunBrowser", "RunTableModel", "format_duration", "format_loss"]

log = logging.getLogger(__name__)

WATCH_TIP = "Follow the selected live run as it trains, and steer it (double-click)"
#: A button's frame and margins either side of its text (the style's own, 2 x (6 + 2) px in Fusion).
BUTTON_PADDING = 18


class RunBrowser(QWidget):
    """The table of stored runs with Open, Watch, Overlay, Rename, Delete and Refresh.

    Signals: ``openRequested(int)`` with a run id; ``watchRequested(int)`` with the id of a live run;
    ``overlayRequested(list)`` with two or more run ids in the order shown.
    """

    openRequested = Signal(int)
    overlayRequested = Signal(list)
    watchRequested = Signal(int)

    def __init__(self, store: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self._store = store
        self.model = RunTableModel(self)
        self.model.rename_handler = self.rename_run
        self.proxy = RunSortProxy(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.proxy.setFilterKeyColumn(-1)
        self.proxy.setDynamicSortFilter(False)

        self.view = QTableView(self)
        self.view.setModel(self.proxy)
        self.view.setSortingEnabled(True)
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.view.setEditTriggers(QAbstractItemView.EditTrigger.EditKeyPressed)
        self.view.setAlternatingRowColors(True)
        self.view.setWordWrap(False)
        self.view.verticalHeader().setVisible(False)
        self.view.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header = self.view.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setSectionResizeMode(COL_NAME, QHeaderView.ResizeMode.Stretch)
        header.setHighlightSections(False)
        self.view.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.view.sortByColumn(COL_STARTED, Qt.SortOrder.DescendingOrder)

        self.filter_edit = QLineEdit(self)
        self.filter_edit.setPlaceholderText("Filter runs by name, script or status")
        self.filter_edit.setClearButtonEnabled(True)

        self.open_action = self._action("&Open", "Show the selected run in the plots (double-click, Return)")
        self.watch_action = self._action("&Watch", WATCH_TIP)
        self.overlay_action = self._action("O&verlay", "Draw the selected runs (two or more) together")
        self.rename_action = self._action("&Rename", "Rename the selected run", QKeySequence(Qt.Key.Key_F2))
        self.delete_action = self._action("&Delete…", "Delete the selected runs from the store",
                                          QKeySequence(QKeySequence.StandardKey.Delete))
        self.refresh_action = self._action("Re&fresh", "Read the run list again", QKeySequence(QKeySequence.StandardKey.Refresh))

        self.open_button = self._button(self.open_action)
        self.watch_button = self._button(self.watch_action)
        self.watch_button.setObjectName("watchButton")
        self.overlay_button = self._button(self.overlay_action)
        self.rename_button = self._button(self.rename_action)
        self.delete_button = self._button(self.delete_action)
        self.refresh_button = self._button(self.refresh_action)
        # "12 runs · 3 selected" grows as runs come and go: it must not widen the dock (and move the
        # buttons under the mouse); it ends in "…" instead, the whole text in its tooltip.
        self.count_label = ElidedLabel("", self)
        self.count_label.setMinimumWidth(self.count_label.fontMetrics().horizontalAdvance("9 runs"))
        self.count_label.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)

        top = QHBoxLayout()
        top.addWidget(self.filter_edit, 1)
        top.addWidget(self.refresh_button)
        buttons = QHBoxLayout()
        for b in (self.open_button, self.watch_button, self.overlay_button, self.rename_button, self.delete_button):
            buttons.addWidget(b)
        buttons.addWidget(self.count_label, 1)  # takes the room left, text at its right end
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addWidget(self.view, 1)
        layout.addLayout(buttons)

        self.open_action.triggered.connect(self._on_open)
        self.watch_action.triggered.connect(self._on_watch)
        self.overlay_action.triggered.connect(self._on_overlay)
        self.rename_action.triggered.connect(self._on_rename)
        self.delete_action.triggered.connect(self._on_delete)
        self.refresh_action.triggered.connect(self.refresh)
        self.view.doubleClicked.connect(self._on_double_click)
        self.view.installEventFilter(self)
        self.view.customContextMenuRequested.connect(self._on_context_menu)
        self.view.selectionModel().selectionChanged.connect(self._update_actions)
        self.filter_edit.textChanged.connect(self._on_filter)
        header.sortIndicatorChanged.connect(lambda *_: self._update_actions())

        self.refresh()

    # ---- public API ----

    @property
    def store(self) -> Any:
        return self._store

    def refresh(self) -> None:
        """Read the run list again (marking runs whose process died as interrupted), keeping the
        selection and the sort order."""
        selected = self.selected_run_ids()
        runs: list[Any] = []
        if self._store is not None:
            mark_interrupted = getattr(self._store, "mark_interrupted", None)
            try:
                if mark_interrupted is not None:
                    mark_interrupted()
            except LrvizError as exc:  # e.g. a read-only store: still listable
                log.warning("could not check for interrupted runs: %s", exc)
            try:
                runs = self._store.list_runs()
            except LrvizError as exc:
                self._error("Cannot list the runs", exc)
                runs = []
        live: set[int] = set()
        path = getattr(self._store, "path", None)
        if path is not None:
            try:
                live = set(live_runs(path))
            except OSError as exc:
                log.warning("cannot look for live runs: %s", exc)
        self.model.set_runs(runs, live)
        self.proxy.sort(self.proxy.sortColumn(), self.proxy.sortOrder())
        self._fit_columns()
        self.select_runs(selected)
        self._update_actions()

    def selected_run_ids(self) -> list[int]:
        """Ids of the selected runs, in the order shown."""
        sm = self.view.selectionModel()
        if sm is None:
            return []
        rows = sorted(index.row() for index in sm.selectedRows())
        return [int(self.proxy.index(r, 0).data(RUN_ID_ROLE)) for r in rows]

    def select_runs(self, run_ids: Iterable[int]) -> None:
        """Select these runs (those shown), and nothing else."""
        sm = self.view.selectionModel()
        selection = QItemSelection()
        first: QModelIndex | None = None
        for run_id in run_ids:
            row = self.model.row_of(int(run_id))
            if row is None:
                continue
            index = self.proxy.mapFromSource(self.model.index(row, 0))
            if not index.isValid():
                continue
            selection.select(index, index)
            first = first or index
        flags = QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows
        sm.select(selection, flags)
        if first is not None:
            sm.setCurrentIndex(first, QItemSelectionModel.SelectionFlag.NoUpdate)
            self.view.scrollTo(first)

    def rename_run(self, run_id: int, name: str) -> bool:
        """Rename a run in the store; False (after telling the user) when the store refuses."""
        name = str(name).strip()
        try:
            self._store.rename_run(run_id, name)
        except LrvizError as exc:
            self._error("Cannot rename the run", exc)
            return False
        log.info("renamed run %s to %r", run_id, name)
        return True

    def delete_runs(self, run_ids: Sequence[int], *, confirm: bool = True) -> bool:
        """Delete runs after asking (naming them); True when they were deleted."""
        infos = [self.model.run_at(r) for r in (self.model.row_of(i) for i in run_ids) if r is not None]
        if not infos:
            return False
        active = [i for i in infos if i.status in ACTIVE_STATUSES]
        if active:
            names = ", ".join(f"'{i.name}'" for i in active)
            QMessageBox.information(
                self, "Delete runs",
                f"{names} {'is' if len(active) == 1 else 'are'} still running or paused. "
                "Stop the run first, then delete it.",
            )
            return False
        if confirm and not self._confirm_delete(infos):
            return False
        failed = False
        for info in infos:
            try:
                self._store.delete_run(info.id)
                log.info("deleted run %s (%s)", info.id, info.name)
            except LrvizError as exc:
                self._error(f"Cannot delete run '{info.name}'", exc)
                failed = True
                break
        self.refresh()
        return not failed

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802
        """Return or Enter on the table (not in an editor) opens the selected run."""
        if (
            watched is self.view
            and event.type() == QEvent.Type.KeyPress
            and event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter)
            and self.view.state() != QAbstractItemView.State.EditingState
        ):
            self._on_open()
            return True
        return super().eventFilter(watched, event)

    # ---- actions ----

    def _action(self, text: str, tip: str, shortcut: QKeySequence | None = None) -> QAction:
        action = QAction(text, self)
        action.setToolTip(tip)
        action.setStatusTip(tip)
        if shortcut is not None:
            action.setShortcut(shortcut)
            action.setShortcutContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
        self.addAction(action)
        return action

    def _button(self, action: QAction) -> QPushButton:
        button = QPushButton(action.text(), self)
        # As narrow as its text (the style's floor is 80 px a button): six buttons of 80 px made the
        # dock, and with it a 1280-px window, wider than the window once Watch joined the row.
        label = action.text().replace("&", "")
        button.setMinimumWidth(button.fontMetrics().horizontalAdvance(label) + BUTTON_PADDING)
        button.setToolTip(action.toolTip())
        button.clicked.connect(action.trigger)
        action.changed.connect(lambda: (button.setEnabled(action.isEnabled()), button.setToolTip(action.toolTip())))
        button.setEnabled(action.isEnabled())
        return button

    def _update_actions(self, *_: Any) -> None:
        ids = self.selected_run_ids()
        n = len(ids)
        self.open_action.setEnabled(n == 1)
        self.watch_action.setEnabled(n == 1 and ids[0] in self.model.live)
        row = self.model.row_of(ids[0]) if n == 1 else None
        reason = read_only_reason(self.model.run_at(row)) if row is not None else None
        self.watch_action.setToolTip(reason or WATCH_TIP)  # an imported run says why it cannot be watched
        self.overlay_action.setEnabled(n >= 2)
        self.rename_action.setEnabled(n == 1)
        self.delete_action.setEnabled(n >= 1)
        total = self.model.rowCount()
        shown = self.proxy.rowCount()
        text = f"{total} run{'s' if total != 1 else ''}"
        if shown != total:
            text = f"{shown} of {text}"
        if n:
            text += f" · {n} selected"
        self.count_label.setText(text)

    def _on_open(self) -> None:
        ids = self.selected_run_ids()
        if len(ids) == 1:
            self.openRequested.emit(ids[0])

    def _on_double_click(self, index: QModelIndex) -> None:
        if index.isValid():
            run_id = int(index.data(RUN_ID_ROLE))
            (self.watchRequested if run_id in self.model.live else self.openRequested).emit(run_id)

    def _on_watch(self) -> None:
        ids = self.selected_run_ids()
        if len(ids) == 1 and ids[0] in self.model.live:
            self.watchRequested.emit(ids[0])

    def _on_overlay(self) -> None:
        ids = self.selected_run_ids()
        if len(ids) >= 2:
            self.overlayRequested.emit(ids)

    def _on_rename(self) -> None:
        ids = self.selected_run_ids()
        if len(ids) != 1:
            return
        row = self.model.row_of(ids[0])
        if row is None:
            return
        index = self.proxy.mapFromSource(self.model.index(row, COL_NAME))
        self.view.setCurrentIndex(index)
        self.view.edit(index)

    def _on_delete(self) -> None:
        ids = self.selected_run_ids()
        if ids:
            self.delete_runs(ids)

    def _on_filter(self, text: str) -> None:
        self.proxy.setFilterFixedString(text.strip())
        self._update_actions()

    def _on_context_menu(self, pos: Any) -> None:
        menu = QMenu(self)
        for action in (self.open_action, self.watch_action, self.overlay_action, self.rename_action,
                       self.delete_action):
            menu.addAction(action)
        menu.addSeparator()
        menu.addAction(self.refresh_action)
        menu.popup(self.view.viewport().mapToGlobal(pos))

    # ---- helpers ----

    def _confirm_delete(self, infos: Sequence[Any]) -> bool:
        names = [f"'{i.name}' (#{i.id})" for i in infos]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        what = f"run {shown}" if len(infos) == 1 else f"{len(infos)} runs: {shown}"
        answer = QMessageBox.question(
            self,
            "Delete runs",
            f"Delete {what}?\n\nTheir steps, events, validation points and checkpoints are removed "
            "from the store. This cannot be undone.",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Cancel,
        )
        return answer == QMessageBox.StandardButton.Yes

    def _error(self, what: str, exc: Exception) -> None:
        log.warning("%s: %s", what, exc)
        QMessageBox.warning(self, "Run store", f"{what}:\n{exc}")

    def _fit_columns(self) -> None:
        header = self.view.horizontalHeader()
        for col in range(len(COLUMNS)):
            if col != COL_NAME:
                self.view.resizeColumnToContents(col)
                header.resizeSection(col, min(header.sectionSize(col), 260))
