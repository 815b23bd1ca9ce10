"""The lrviz main window: controls on the left, live plots in the middle, script notes, runs and the
lab's panels on the right, the shown run's state in the status bar.

The window never trains and never imports torch: runs train in processes of their own (started
from the app's :class:`~lrviz.live.child.WorkerPool`, or anywhere else and watched), and the window
reads them through one :class:`~lrviz.live.run.Run` interface from its one timer (at most 30 times
a second). Its rooms: :mod:`.script_loading` (Open, recent files, Reload, drag and drop),
:mod:`.run_control` (Start, Pause, Step, Stop, the commands and their answers, Watch, Connect,
what closing does), :mod:`.stored_runs` (open and overlay stored runs), :mod:`.status_bar`,
:mod:`.export_actions`, :mod:`.app_settings`.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QEvent, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QCloseEvent, QDragEnterEvent, QDropEvent, QKeySequence
from PySide6.QtWidgets import (
    QDockWidget,
    QLabel,
    QMainWindow,
    QMessageBox,
    QStyle,
    QTextBrowser,
    QToolBar,
    QVBoxLayout,
    QWidget,
)

from lrviz.errors import ConfigError, StoreError
from lrviz.states import RunState

from .app_settings import APP, ORG, AppSettings
from .controls import ControlPanel
from .export_actions import ExportActions
from .plot_bar import PlotBar
from .plots import TrainingPlots
from .run_browser import RunBrowser
from .run_control import RunControl
from .script_loading import ScriptLoader, dropped_script
from .status_bar import RunStatusBar
from .stored_runs import StoredRuns

if TYPE_CHECKING:
    from collections.abc import Callable

    from lrviz.config import RunConfig
    from lrviz.live.child import ChildRun, WorkerPool
    from lrviz.live.run import Run
    from lrviz.scriptinfo import ScriptInfo
    from lrviz.store.runs import RunStore

__all__ = ["APP", "ORG", "MainWindow"]

log = logging.getLogger(__name__)

TICK_MS = 33  # the one redraw timer: at most ~30 times a second
#: The timer keeps going this many ticks after the last thing it watched went quiet.
LINGER_TICKS = 30


class MainWindow(QMainWindow):
    """The desktop app: open a script, train it live, steer the learning rate, compare runs.

    What the lab panels (and any other part of the app) may use of the window — nothing else:

    - ``run`` (a :class:`lrviz.live.run.Run` or None): the run the window shows now, live or just
      ended; ``runChanged(run_or_None)`` when another one is shown (started, attached, detached);
      ``runEnded(state)`` when the shown run has ended (its process exited).
    - ``script_info`` (a :class:`lrviz.scriptinfo.ScriptInfo` or None), ``scriptChanged(info)`` when
      a script (or a new version of it) is loaded; ``scriptLoaded(path)`` after every load attempt
      ("" when it failed).
    - ``config()``: the :class:`lrviz.config.RunConfig` the controls say now (ConfigError when a field
      is wrong); ``run_spec(config=None, **extra)``: a run spec (see
      :func:`lrviz.live.serve.build_engine`) of the loaded script with that config and the store;
      ``start_run(spec, show=True)``: train it in a worker of the app's pool, a
      :class:`lrviz.live.child.ChildRun` (``show=True``: it becomes ``run``; else the caller follows
      and stops it; closing stops what is left). ``show_run(run)``: show any Run (a ``LocalRun`` in
      unit tests).
    - ``add_spec_hook(fn)``: ``fn(spec)`` may change the spec Start sends (guard options, per-layer
      statistics, a pace). ``ticked``: the one redraw timer (at most 30 times a second) while a run
      is live, a ``tick_while(busy)`` predicate is true, or for a second after ``wake()``.
    - ``store`` (read-only use), ``store_path``, ``shown_run_id`` (the store id of the run the plots
      show, live or stored), ``add_panel``, ``add_banner``, ``controls`` (``add_section``, the LR and
      schedule fields), ``show_status``, ``refresh_runs``, ``overlay_runs``, ``load_script``,
      ``is_active``, ``run_browser`` (its selection).
    """

    #: Emitted when a script has been loaded (its path) or failed to load ("").
    scriptLoaded = Signal(str)
    #: The loaded script's ScriptInfo, emitted when a script (or a new version of it) is loaded.
    scriptChanged = Signal(object)
    #: The window's one redraw timer (at most ~30 times a second, while anything is live).
    ticked = Signal()

    def __init__(self, store_path: str | os.PathLike[str] | None = None, parent: QWidget | None = None, *,
                 pool: WorkerPool | None = None):
        super().__init__(parent)
        self.setObjectName("lrvizMainWindow")
        self.setWindowTitle("lrviz")
        self.setAcceptDrops(True)
        self.setDockOptions(QMainWindow.DockOption.AllowTabbedDocks | QMainWindow.DockOption.AnimatedDocks)
        self.closed = False
        self.messages: list[tuple[str, str, str]] = []  # (title, text, detail) of every message shown
        self.prefs = AppSettings()
        self.store: RunStore | None = None
        self._store_error: str | None = None
        self._open_store(store_path)
        self._pool = pool
        self._own_pool = pool is None
        self._script_info: ScriptInfo | None = None
        self._busy: list[Callable[[], bool]] = []
        self._linger = 0

        self.plots = TrainingPlots()
        self.controls = ControlPanel()
        self.runs = RunControl(self)
        self.stored = StoredRuns(self)
        self.exports = ExportActions(self)
        self._build_central()
        self._build_docks()
        self.scripts = ScriptLoader(self)
        self._build_actions()
        self._build_menus()
        self._build_toolbar()
        self.status = RunStatusBar(self)
        self._timer = QTimer(self)
        self._timer.setInterval(TICK_MS)
        self._timer.timeout.connect(self._on_tick)
        self.lab: Any = None
        try:
            from .lab.panels import Lab

            self.lab = Lab(self)
            self.lab.install()
        except Exception:  # another room's failure must not keep the app from starting
            log.exception("the lab panels could not be installed")
            self.lab = None
        self.prefs.restore_window(self)

        self.controls.lrCommitted.connect(self.runs.set_lr)
        self.controls.scheduleApplied.connect(self.runs.set_schedule)
        self.controls.hyperparamsApplied.connect(self.runs.set_hyperparams)
        self.controls.clipApplied.connect(self.runs.set_clip)
        for sig in (self.controls.lr.edit.textChanged, self.controls.length.valueChanged,
                    self.controls.length_kind.currentIndexChanged):
            sig.connect(self.preview_setup)
        self.scripts.loaded.connect(self._on_script_loaded)
        self.scripts.failed.connect(self._on_script_failed)
        self.update_actions()
        self.plots.set_hint("Loading…")
        if self._store_error:
            QTimer.singleShot(0, self, lambda: self.show_message(
                QMessageBox.Icon.Warning, "Run store unavailable",
                f"{self._store_error}\n\nRuns will not be saved in this session.", ""))

    # ---- the seam: what the rest of the app uses ---------------------------------------------------
    @property
    def runChanged(self) -> Any:  # noqa: N802 - a signal
        return self.runs.runChanged

    @property
    def runEnded(self) -> Any:  # noqa: N802 - a signal
        return self.runs.runEnded

    @property
    def run(self) -> Run | None:
        """The run the window shows now (live or just ended), or None."""
        return self.runs.run

    @property
    def script_info(self) -> ScriptInfo | None:
        """What the window knows of the loaded script (from a worker), or None before one loaded."""
        return self._script_info

    @property
    def store_path(self) -> str | None:
        return str(self.store.path) if self.store is not None else None

    @property
    def shown_run_id(self) -> int | None:
        """The store id of the run the plots show (the live one, or one opened from the store)."""
        primary = self.plots.primary
        return primary.trace.run_id if primary is not None else None

    @property
    def pool(self) -> WorkerPool:
        """The app's training processes (one warm worker waits; each run gets its own)."""
        if self._pool is None:
            from lrviz.live.child import WorkerPool

            self._pool = WorkerPool()
        return self._pool

    def config(self) -> RunConfig:
        """The run configuration the controls say now; ConfigError (the field marked) when one is wrong."""
        if self._script_info is None:
            raise ConfigError("load a script first")
        return self.controls.config(self._script_info, self.runs.start_schedule)

    def run_spec(self, config: RunConfig | dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """A run spec for the loaded script: ``config`` (default: :meth:`config`), the store, ``extra``."""
        info = self._script_info
        if info is None:
            raise ConfigError("load a script first")
        if config is None:
            config = self.config()
        cfg = config if isinstance(config, dict) else config.to_dict()
        spec: dict[str, Any] = {"script": str(info.path), "config": dict(cfg), "store": self.store_path}
        spec.update(extra)
        return spec

    def start_run(self, spec: dict[str, Any], *, show: bool = True) -> ChildRun:
        """Train ``spec`` in a process of its own (a worker of the app's pool); ``show``: as ``run``."""
        return self.runs.start_run(spec, show=show)

    def show_run(self, run: Run, label: str = "") -> None:
        """Show ``run`` (any :class:`lrviz.live.run.Run`, e.g. a ``LocalRun`` in a unit test) as the live run."""
        self.runs.show(run, label)

    def start(self, paused: bool = False) -> bool:
        """Start the loaded script with the controls' settings (Start; ``paused``: Step); False when refused."""
        return self.runs.start(paused)

    def add_spec_hook(self, fn: Callable[[dict[str, Any]], Any]) -> None:
        """``fn(spec)`` may change the spec of every run Start sends (it is called just before)."""
        self.runs.spec_hooks.append(fn)

    def tick_while(self, busy: Callable[[], bool]) -> None:
        """Keep the redraw timer (``ticked``) going while ``busy()`` is true (after ``wake()``)."""
        self._busy.append(busy)

    def wake(self) -> None:
        """Start the redraw timer now (it stops by itself once nothing is live)."""
        self._linger = LINGER_TICKS
        if not self._timer.isActive() and not self.closed:
            self._timer.start()

    def is_active(self) -> bool:
        """Whether the shown run is in progress (its end not yet seen)."""
        return self.runs.active()

    def run_in_store(self, run: Run) -> bool:
        """Whether ``run`` is recorded in this window's store (not one connected to from elsewhere)."""
        store = getattr(run, "store_path", None) or (getattr(run, "describe", None) or {}).get("store")
        return bool(store) and self.store_path is not None and os.path.realpath(str(store)) == os.path.realpath(
            self.store_path)

    def load_script(self, path: str | os.PathLike[str] | None = None) -> bool:
        """Load an experiment script through a worker (None: the last one, else the default example)."""
        return self.scripts.load(None if path is None else os.fspath(path))

    def open_run(self, run_id: int) -> None:
        self.stored.open(run_id)

    def overlay_runs(self, run_ids: list[int]) -> None:
        self.stored.overlay(run_ids)

    def keep_overlays(self) -> None:
        """A new live run is drawn: the compared runs stay, now over it."""
        if self.stored.overlay_ids:
            self.stored.overlay(self.stored.overlay_ids)

    def shown_state(self) -> str:
        run = self.run
        if run is not None:
            return str(run.state)
        return "viewing" if self.plots.primary is not None or self.plots.overlays else RunState.IDLE

    # ---- building ----------------------------------------------------------------------------------
    def _open_store(self, store_path: str | os.PathLike[str] | None) -> None:
        from lrviz.store.runs import RunStore

        try:
            self.store = RunStore(store_path)
        except StoreError as exc:
            self.store = None
            self._store_error = str(exc)
            log.warning("%s", exc)

    def _build_central(self) -> None:
        central = QWidget()
        col = QVBoxLayout(central)
        col.setContentsMargins(4, 2, 4, 0)
        col.setSpacing(2)
        self.plot_bar = PlotBar(self.plots)
        self.smoothing = self.plot_bar.smoothing
        self.log_checks = self.plot_bar.log_checks
        self.view_label = self.plot_bar.view_label
        # a script dropped on the plots reaches the window (the graphics view would swallow it)
        self.plots.view.setAcceptDrops(False)
        self.plots.view.viewport().setAcceptDrops(False)
        col.addLayout(self.plot_bar)
        self._banner_index = col.count()
        col.addWidget(self.plots, 1)
        self._central_layout = col
        self.setCentralWidget(central)

    def _dock(self, title: str, name: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(name)
        dock.setWidget(widget)
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable
                         | QDockWidget.DockWidgetFeature.DockWidgetClosable
                         | QDockWidget.DockWidgetFeature.DockWidgetFloatable)
        self.addDockWidget(area, dock)
        return dock

    def _build_docks(self) -> None:
        right = Qt.DockWidgetArea.RightDockWidgetArea
        self.controls_dock = self._dock("Controls", "controlsDock", self.controls, Qt.DockWidgetArea.LeftDockWidgetArea)
        self.notes = QTextBrowser()
        self.notes.setObjectName("scriptNotes")
        self.notes.setOpenExternalLinks(True)
        self.notes_dock = self._dock("Script", "notesDock", self.notes, right)
        self.run_browser: RunBrowser | None = None
        self.runs_dock: QDockWidget | None = None
        if self.store is not None:
            self.run_browser = RunBrowser(self.store)
            self.run_browser.setObjectName("runBrowser")
            self.run_browser.openRequested.connect(self.open_run)
            self.run_browser.overlayRequested.connect(self.overlay_runs)
            self.run_browser.watchRequested.connect(self.runs.watch)
            self.runs_dock = self._dock("Runs", "runsDock", self.run_browser, right)
            self.splitDockWidget(self.notes_dock, self.runs_dock, Qt.Orientation.Vertical)
            self.resizeDocks([self.notes_dock, self.runs_dock], [260, 440], Qt.Orientation.Vertical)
        self.resizeDocks([self.controls_dock], [330], Qt.Orientation.Horizontal)
        self.resizeDocks([self.notes_dock], [300], Qt.Orientation.Horizontal)

    def add_panel(self, title: str, widget: QWidget, name: str | None = None) -> QDockWidget:
        """Add a tool panel (LR range test, sweeps, divergence guard, diagnostics...) on the right, as a
        tab beside Runs (or Script); it is listed in the View menu."""
        dock = self._dock(title, name or f"{title.lower().replace(' ', '_')}Dock", widget,
                          Qt.DockWidgetArea.RightDockWidgetArea)
        self.tabifyDockWidget(self.runs_dock or self.notes_dock, dock)
        self.view_menu.insertAction(self._docks_separator, dock.toggleViewAction())
        return dock

    def add_banner(self, widget: QWidget) -> None:
        """Put ``widget`` (e.g. the divergence guard's explanation) between the plot bar and the plots."""
        self._central_layout.insertWidget(self._banner_index, widget)
        self._banner_index += 1

    def _action(self, text: str, slot: Any, shortcut: Any = None, tip: str = "", icon: Any = None,
                name: str = "") -> QAction:
        a = QAction(text, self)
        if shortcut is not None:
            a.setShortcut(QKeySequence(shortcut))
            a.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
        if tip:
            a.setToolTip(tip)
            a.setStatusTip(tip)
        if icon is not None:
            a.setIcon(self.style().standardIcon(icon))
        if name:
            a.setObjectName(name)
        a.triggered.connect(slot)
        return a

    def _build_actions(self) -> None:
        sp = QStyle.StandardPixmap
        runs = self.runs
        self.act_open = self._action("&Open script…", self.scripts.open_dialog, QKeySequence.StandardKey.Open,
                                     "open an experiment script (.py)", sp.SP_DialogOpenButton)
        self.act_reload = self._action("&Reload script", self.scripts.reload, "Ctrl+R",
                                       "load the script again after editing it", sp.SP_BrowserReload)
        self.act_connect = self._action("&Connect to a run…", self._on_connect, None,
                                        "watch and steer a run started with lrviz run --listen HOST:PORT",
                                        name="actConnect")
        self.act_export_plot = self._action("Export &plot…", self.exports.on_export_plot, "Ctrl+E",
                                            "save the plots of the shown runs as PNG, SVG or PDF")
        self.act_export_data = self._action("Export &data…", self.exports.on_export_data, "Ctrl+Shift+E",
                                            "save the shown run's every step as CSV, or the run as JSON")
        self.act_quit = self._action("&Quit", self.close, QKeySequence.StandardKey.Quit)
        self.act_start = self._action("Start", lambda: runs.start(), "Ctrl+Return", "start training (Ctrl+Enter)",
                                      sp.SP_MediaPlay, "actStart")
        self.act_pause = self._action("Pause", runs.toggle_pause, "Space", "pause or resume (Space)",
                                      sp.SP_MediaPause, "actPause")
        self.act_step = self._action("Step", runs.step_once, "Ctrl+.", "run one step, then pause (Ctrl+.)",
                                     sp.SP_MediaSkipForward, "actStep")
        self.act_stop = self._action("Stop", runs.stop, None, "stop the run (it is saved)", sp.SP_MediaStop,
                                     "actStop")
        self.act_fit = self._action("&Fit all", self.plots.reset_view, "Ctrl+0", "show all steps")
        self.act_clear_overlays = self._action("Clear &overlays", lambda: self.overlay_runs([]), None,
                                               "remove the overlaid runs from the plots")
        self.act_about = self._action("&About lrviz", self._on_about)

    def _build_menus(self) -> None:
        mb = self.menuBar()
        f = mb.addMenu("&File")
        f.addAction(self.act_open)
        f.addMenu(self.scripts.recent_menu)
        f.addAction(self.act_reload)
        f.addSeparator()
        f.addAction(self.act_connect)
        f.addSeparator()
        f.addAction(self.act_export_plot)
        f.addAction(self.act_export_data)
        f.addSeparator()
        f.addAction(self.act_quit)
        r = mb.addMenu("&Run")
        for a in (self.act_start, self.act_pause, self.act_step, self.act_stop):
            r.addAction(a)
        v = mb.addMenu("&View")
        self.view_menu = v
        v.addAction(self.act_fit)
        v.addAction(self.act_clear_overlays)
        v.addSeparator()
        for d in (self.controls_dock, self.notes_dock, self.runs_dock):
            if d is not None:
                v.addAction(d.toggleViewAction())
        self._docks_separator = v.addSeparator()
        mb.addMenu("&Help").addAction(self.act_about)

    def _build_toolbar(self) -> None:
        tb = QToolBar("Run", self)
        tb.setObjectName("runToolbar")
        tb.setMovable(False)
        tb.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        for a in (self.act_open, self.act_reload):
            tb.addAction(a)
        tb.addSeparator()
        for a in (self.act_start, self.act_pause, self.act_step, self.act_stop):
            tb.addAction(a)
        tb.addSeparator()
        self.script_label = QLabel("")
        self.script_label.setObjectName("scriptLabel")
        self.script_label.setStyleSheet("padding-left: 6px; font-weight: 600;")
        tb.addWidget(self.script_label)
        self.addToolBar(Qt.ToolBarArea.TopToolBarArea, tb)
        self.toolbar = tb
        for a in (self.act_start, self.act_pause, self.act_step, self.act_stop):
            btn = tb.widgetForAction(a)
            if btn is not None:
                btn.setObjectName(a.objectName().replace("act", "button"))

    # ---- messages ----------------------------------------------------------------------------------
    def show_message(self, icon: QMessageBox.Icon, title: str, text: str, detail: str = "") -> QMessageBox:
        """A window-modal message box that does not block the event loop (runs keep being drawn);
        ``detail`` (a traceback) goes behind its "Show Details…" button."""
        self.messages.append((title, text, detail))
        box = QMessageBox(icon, title, text, QMessageBox.StandardButton.Ok, self)
        box.setObjectName("lrvizMessage")
        if detail:
            box.setDetailedText(detail)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.open()
        return box

    def show_status(self, text: str, ms: int = 8000) -> None:
        """A message in the status bar."""
        self.status.message(text, ms)

    def refresh_runs(self) -> None:
        """Read the run list of the run browser again."""
        if self.run_browser is not None and not self.closed:
            self.run_browser.refresh()

    def refresh_actions(self) -> None:
        """Enable and name the run buttons for the current state (after a panel changed it)."""
        self.update_actions()

    # ---- scripts -----------------------------------------------------------------------------------
    def _on_script_loaded(self, info: ScriptInfo) -> None:
        before = self._script_info
        self._script_info = info
        if before is not None and before.path != info.path and not self.is_active():
            self.runs.forget()  # another script: its plots start empty
            self.stored.clear()
            self.status.set_state(RunState.IDLE)
            self.status.clear()
        try:
            from lrviz.config import RunConfig

            self.runs.start_schedule = RunConfig(**info.defaults).validated().schedule
        except (ConfigError, TypeError):
            self.runs.start_schedule = None
        self.runs.show_start_schedule()
        self.runs.script_loaded(info)
        if self.plots.primary is None:
            self.plots.set_hint(f"Press Start (Ctrl+Enter) to train {info.path.name}")
        self.preview_setup()
        self.update_actions()
        self.scriptChanged.emit(info)
        self.scriptLoaded.emit(str(info.path))

    def _on_script_failed(self, ref: str) -> None:
        self.update_actions()
        self.scriptLoaded.emit("")

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802
        if dropped_script(event) is not None:
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802
        path = dropped_script(event)
        if path is not None:
            event.acceptProposedAction()
            self.load_script(path)

    # ---- runs --------------------------------------------------------------------------------------
    def _on_connect(self) -> None:
        from .connect_dialog import ConnectDialog

        dialog = ConnectDialog(self)
        if dialog.exec() and dialog.info is not None:
            self.runs.attach(dialog.info, dialog.info.where, what="Cannot connect to the run")

    def preview_setup(self, *_: object) -> None:
        """Before a run: the schedule preview follows the rate and length in the controls."""
        if self.is_active():
            return
        try:
            lr = self.controls.lr.value()
        except ConfigError:
            return
        remaining = self.controls.length.value() if self.controls.length_kind.currentText() == "steps" else None
        self.controls.schedule.set_context([lr], 0, remaining)

    def update_actions(self) -> None:
        runs = self.runs
        active = runs.active()
        loaded = self._script_info is not None
        state = runs.run.state if runs.run is not None else RunState.IDLE
        self.act_start.setEnabled(loaded and not active)
        self.act_step.setEnabled((loaded and not active) or (active and state == RunState.PAUSED))
        self.act_stop.setEnabled(active)
        sp = QStyle.StandardPixmap
        if runs.paused():
            self.act_pause.setText("Resume")
            self.act_pause.setIcon(self.style().standardIcon(sp.SP_MediaPlay))
        else:
            self.act_pause.setText("Pause")
            self.act_pause.setIcon(self.style().standardIcon(sp.SP_MediaPause))
        self.act_pause.setEnabled(active or loaded)
        self.act_reload.setEnabled(loaded)
        has_data = self.plots.primary is not None
        self.act_export_plot.setEnabled(has_data or bool(self.plots.overlays))
        self.act_export_data.setEnabled(has_data)
        self.act_clear_overlays.setEnabled(bool(self.stored.overlay_ids))

    # ---- the timer ---------------------------------------------------------------------------------
    def _on_tick(self) -> None:
        if self.closed:
            self._timer.stop()
            return
        self.plots.refresh()
        self.runs.tick()
        self.ticked.emit()
        if self.runs.busy() or any(busy() for busy in self._busy):
            self._linger = LINGER_TICKS
        else:
            self._linger -= 1
            if self._linger <= 0:
                self._timer.stop()

    # ---- misc --------------------------------------------------------------------------------------
    def _on_about(self) -> None:
        from lrviz import __version__

        QMessageBox.about(self, "About lrviz", f"<b>lrviz {__version__}</b><p>A learning-rate laboratory for "
                          "PyTorch: watch loss and learning rate live, pause, change the rate or the schedule, "
                          "resume, compare runs.</p>")

    def changeEvent(self, event: QEvent) -> None:  # noqa: N802
        """Coming back to the window: the run list may have changed (a run started in a terminal)."""
        if event.type() == QEvent.Type.ActivationChange and self.isActiveWindow() and not self.closed:
            self.refresh_runs()
        super().changeEvent(event)

    # ---- closing -----------------------------------------------------------------------------------
    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802
        """Runs this app started and that still train: asks whether to stop them or leave them running
        (the next start attaches to them again). Runs it only watched go on, unasked."""
        if not self.runs.ask_on_close():
            event.ignore()
            return
        if self.lab is not None:
            self.lab.shutdown()
        self.runs.stop_and_wait(self.runs.hidden_live())  # what a panel started for itself and left
        self.closed = True
        self._timer.stop()
        self.runs.detach_all()
        if self._pool is not None and self._own_pool:
            self._pool.close()
        self.prefs.save_window(self)
        if self.store is not None:
            self.store.close()
        event.accept()

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop every run this window started and wait for them; detach from the rest (tests, scripts)."""
        if self.lab is not None:
            self.lab.shutdown(timeout)
        ok = self.runs.stop_and_wait(self.runs.live_started() + self.runs.hidden_live(), timeout)
        self.runs.detach_all()
        return ok
