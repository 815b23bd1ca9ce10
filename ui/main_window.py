"""The lrviz main window: controls on the left, live plots in the middle, script notes and runs on
the right, run state in the status bar.

The window owns at most one :class:`~lrviz.engine.TrainingEngine`. It never waits on it: a timer
(30 Hz while a run is live) reads the engine's buffer, events and state; buttons and fields send
commands (pause, set LR, set schedule, stop) that the engine applies at its next step.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PySide6.QtCore import QByteArray, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QCloseEvent, QDragEnterEvent, QDropEvent, QKeySequence
from PySide6.QtWidgets import (
    QCheckBox,
    QDockWidget,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMenu,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSlider,
    QStyle,
    QTextBrowser,
    QToolBar,
    QVBoxLayout,
    QWidget,
)

from lrviz.errors import ConfigError, LrvizError, ScriptError, StoreError
from lrviz.records import StepBuffer

from . import (
    _compat,  # noqa: F401  (must run first: PySide6 6.12 signal refcount defect)
    theme,
)
from .controls import ControlPanel
from .plots import TrainingPlots
from .trace import RunTrace
from .widgets import ElidedLabel, format_number

if TYPE_CHECKING:
    from lrviz.engine import TrainingEngine
    from lrviz.experiment import Experiment
    from lrviz.store import RunStore

log = logging.getLogger(__name__)

ORG = "lrviz"
APP = "lrviz"
MAX_RECENT = 10
TICK_MS = 33  # redraws at most ~30 times a second
STATUS_EVERY_S = 0.25  # the status bar's figures
CONTEXT_EVERY_S = 1.0  # the schedule preview's starting point, mid-run
RUNS_REFRESH_S = 5.0  # the run browser's list, while a run is live
TERMINAL = ("finished", "stopped", "diverged", "failed")
STATE_COLOURS = {
    "idle": theme.GREY, "preparing": theme.ORANGE, "running": theme.GREEN, "paused": theme.BLUE,
    "finished": theme.BLACK, "stopped": theme.GREY, "diverged": theme.VERMILLION, "failed": theme.VERMILLION,
    "viewing": theme.PURPLE, "loading": theme.ORANGE,
}

try:  # written by another engineer; the window works without it
    from .run_browser import RunBrowser
except ImportError:  # pragma: no cover - depends on the tree
    RunBrowser = None  # type: ignore[assignment,misc]
try:  # the learning-rate lab panels (range test, sweep, guard, fork, surface, diagnostics)
    from .lab import Lab
except ImportError:  # pragma: no cover - depends on the tree
    Lab = None  # type: ignore[assignment,misc]
try:
    from .lab_notes import notes_html
except ImportError:  # pragma: no cover - depends on the tree
    notes_html = None  # type: ignore[assignment]


def settings() -> QSettings:
    """The app's persistent settings (QSettings, organisation and application "lrviz")."""
    return QSettings(ORG, APP)


def _detail_of(err: BaseException) -> str:
    cause = err.__cause__ or err.__context__
    if cause is not None:
        return "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
    return getattr(err, "detail", "") or str(err)


def _fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def export_path(path: str, chosen: str, filters: list[tuple[str, str]]) -> tuple[str, str]:
    """The file and format a save dialog's answer means: an extension typed in the name wins over
    the filter picked (``run1.svg`` with the PNG filter is an SVG); otherwise the filter's extension
    is added (``run1`` with the PDF filter is ``run1.pdf``)."""
    known = [fmt for _, fmt in filters]
    typed = Path(path).suffix.lstrip(".").lower()
    if typed in known:
        return str(Path(path).with_suffix(f".{typed}")), typed
    fmt = dict(filters).get(chosen) or known[0]
    return f"{path}.{fmt}", fmt


class MainWindow(QMainWindow):
    """The desktop app: open a script, train it live, steer the learning rate, compare runs."""

    #: (path asked, Experiment or None, LrvizError or None, devices): from the loader thread.
    _scriptLoaded = Signal(object, object, object, object)
    #: Emitted when a run starts (its TrainingEngine), after the window shows it.
    runStarted = Signal(object)
    #: Emitted when a run ends (its final state), after the window has handled it.
    runEnded = Signal(str)
    #: Emitted when a script has been loaded (its path) or failed to load ("").
    scriptLoaded = Signal(str)

    def __init__(self, store_path: str | os.PathLike[str] | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("lrvizMainWindow")
        self.setWindowTitle("lrviz")
        self.setAcceptDrops(True)
        self.setDockOptions(QMainWindow.DockOption.AllowTabbedDocks | QMainWindow.DockOption.AnimatedDocks)
        self.experiment: Experiment | None = None
        self.engine: TrainingEngine | None = None
        self.store: RunStore | None = None
        self._store_error: str | None = None
        self._end_handled = True
        self._start_schedule: str | None = None
        self._listed_run = False
        self._closed = False
        self._pause_asked = False
        self._status_at = self._context_at = self._runs_at = 0.0
        self._overlay_ids: list[int] = []
        self._loader: threading.Thread | None = None
        self._loading_path: str | None = None
        self._ticks = 0
        self._last_state = ""
        self.messages: list[tuple[str, str, str]] = []  # (title, text, detail) of every message shown
        self._settings = settings()
        self._open_store(store_path)

        self.plots = TrainingPlots()
        self.controls = ControlPanel()
        self._build_central()
        self._build_docks()
        self._build_actions()
        self._build_menus()
        self._build_toolbar()
        self._build_status_bar()
        self.lab: Any = None
        if Lab is not None:
            try:
                self.lab = Lab(self)
                self.lab.install()
            except Exception:  # another module's failure must not keep the app from starting
                log.exception("the lab panels could not be installed")
                self.lab = None
        self._restore_settings()

        self.controls.lrCommitted.connect(self._on_lr_committed)
        self.controls.scheduleApplied.connect(self._on_schedule_applied)
        self.controls.hyperparamsApplied.connect(self._on_hyperparams_applied)
        self.controls.lr.edit.textChanged.connect(self._on_setup_changed)
        self.controls.length.valueChanged.connect(self._on_setup_changed)
        self.controls.length_kind.currentIndexChanged.connect(self._on_setup_changed)
        self._scriptLoaded.connect(self._on_script_loaded)

        self._timer = QTimer(self)
        self._timer.setInterval(TICK_MS)
        self._timer.timeout.connect(self._on_tick)
        self._update_actions()
        self.plots.set_hint("Loading…")
        if self._store_error:
            QTimer.singleShot(0, self, lambda: self._show_message(
                QMessageBox.Icon.Warning, "Run store unavailable",
                f"{self._store_error}\n\nRuns will not be saved in this session.", ""))

    # ---- building --------------------------------------------------------------------------------
    def _open_store(self, store_path: str | os.PathLike[str] | None) -> None:
        from lrviz.store import RunStore

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
        bar = QHBoxLayout()
        bar.setSpacing(6)
        self.smoothing = QSlider(Qt.Orientation.Horizontal)
        self.smoothing.setObjectName("smoothingSlider")
        self.smoothing.setRange(0, 99)
        self.smoothing.setValue(60)
        self.smoothing.setFixedWidth(90)
        self.smoothing.setToolTip("smoothing of the training loss: a debiased exponential moving average "
                                  "(as in TensorBoard); 0 is off")
        self.smoothing_label = QLabel("smoothing 0.60")
        self.smoothing_label.setMinimumWidth(self.smoothing_label.fontMetrics().horizontalAdvance("smoothing 0.00"))
        self.log_checks: dict[str, QCheckBox] = {}
        bar.addWidget(self.smoothing_label)
        bar.addWidget(self.smoothing)
        bar.addSpacing(6)
        bar.addWidget(QLabel("log y:"))
        for plot, text in (("loss", "loss"), ("lr", "LR"), ("grad", "grad")):
            box = QCheckBox(text)
            box.setObjectName(f"log_{plot}")
            box.setToolTip(f"logarithmic y axis for the {text} plot")
            box.setChecked(self.plots.log_y(plot))
            box.toggled.connect(lambda on, p=plot: self.plots.set_log_y(p, on))
            self.log_checks[plot] = box
            bar.addWidget(box)
        self.view_label = ElidedLabel("")
        self.view_label.setObjectName("viewLabel")
        self.view_label.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        self.view_label.setStyleSheet(f"color: {theme.PURPLE};")
        bar.addWidget(self.view_label, 1)
        fit = QPushButton("Fit")
        fit.setObjectName("fitButton")
        fit.setToolTip("show all steps and follow new ones (also: the A button in a plot's corner)")
        fit.clicked.connect(self.plots.reset_view)
        fit.setAutoDefault(False)
        bar.addWidget(fit)
        # a script dropped on the plots reaches the window (the graphics view would swallow it)
        self.plots.view.setAcceptDrops(False)
        self.plots.view.viewport().setAcceptDrops(False)
        col.addLayout(bar)
        self._banner_index = col.count()
        col.addWidget(self.plots, 1)
        self._central_layout = col
        self.setCentralWidget(central)
        self._smooth_timer = QTimer(self)
        self._smooth_timer.setSingleShot(True)
        self._smooth_timer.setInterval(120)
        self._smooth_timer.timeout.connect(self._on_smoothing_settled)
        self.smoothing.valueChanged.connect(self._on_smoothing_moved)

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
        self.controls_dock = self._dock("Controls", "controlsDock", self.controls, Qt.DockWidgetArea.LeftDockWidgetArea)
        self.notes = QTextBrowser()
        self.notes.setObjectName("scriptNotes")
        self.notes.setOpenExternalLinks(True)
        self.notes_dock = self._dock("Script", "notesDock", self.notes, Qt.DockWidgetArea.RightDockWidgetArea)
        self.run_browser: Any = None
        self.runs_dock: QDockWidget | None = None
        if RunBrowser is not None and self.store is not None:
            try:
                self.run_browser = RunBrowser(self.store)
            except Exception as exc:  # another module's failure must not keep the app from starting
                log.warning("the run browser could not be created: %s", exc)
                self.run_browser = None
        if self.run_browser is not None:
            self.run_browser.setObjectName("runBrowser")
            self.run_browser.openRequested.connect(self.open_run)
            self.run_browser.overlayRequested.connect(self.overlay_runs)
            self.runs_dock = self._dock("Runs", "runsDock", self.run_browser, Qt.DockWidgetArea.RightDockWidgetArea)
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

    def _action(self, text: str, slot: Any, shortcut: Any = None, tip: str = "", icon: Any = None) -> QAction:
        a = QAction(text, self)
        if shortcut is not None:
            a.setShortcut(QKeySequence(shortcut))
            a.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
        if tip:
            a.setToolTip(tip)
            a.setStatusTip(tip)
        if icon is not None:
            a.setIcon(self.style().standardIcon(icon))
        a.triggered.connect(slot)
        return a

    def _build_actions(self) -> None:
        sp = QStyle.StandardPixmap
        self.act_open = self._action("&Open script…", self._on_open, QKeySequence.StandardKey.Open,
                                     "open an experiment script (.py)", sp.SP_DialogOpenButton)
        self.act_reload = self._action("&Reload script", self._on_reload, "Ctrl+R",
                                       "load the script again after editing it", sp.SP_BrowserReload)
        self.act_export_plot = self._action("Export &plot…", self._on_export_plot, "Ctrl+E",
                                            "save the plots of the shown runs as PNG, SVG or PDF")
        self.act_export_data = self._action("Export &data…", self._on_export_data, "Ctrl+Shift+E",
                                            "save the shown run's every step as CSV, or the run as JSON")
        self.act_quit = self._action("&Quit", self.close, QKeySequence.StandardKey.Quit)
        self.act_start = self._action("Start", self.start_run, "Ctrl+Return", "start training (Ctrl+Enter)",
                                      sp.SP_MediaPlay)
        self.act_start.setObjectName("actStart")
        self.act_pause = self._action("Pause", self._on_pause_resume, "Space", "pause or resume (Space)",
                                      sp.SP_MediaPause)
        self.act_pause.setObjectName("actPause")
        self.act_step = self._action("Step", self._on_step, "Ctrl+.", "run one step, then pause (Ctrl+.)",
                                     sp.SP_MediaSkipForward)
        self.act_step.setObjectName("actStep")
        self.act_stop = self._action("Stop", self.stop_run, None, "stop the run (it is saved)", sp.SP_MediaStop)
        self.act_stop.setObjectName("actStop")
        self.act_fit = self._action("&Fit all", self.plots.reset_view, "Ctrl+0", "show all steps")
        self.act_clear_overlays = self._action("Clear &overlays", lambda: self.overlay_runs([]), None,
                                               "remove the overlaid runs from the plots")
        self.act_about = self._action("&About lrviz", self._on_about)

    def _build_menus(self) -> None:
        mb = self.menuBar()
        f = mb.addMenu("&File")
        f.addAction(self.act_open)
        self.recent_menu = QMenu("Open &recent", self)
        self.recent_menu.setObjectName("recentMenu")
        f.addMenu(self.recent_menu)
        f.addAction(self.act_reload)
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
        docks = [self.controls_dock, self.notes_dock] + ([self.runs_dock] if self.runs_dock else [])
        for d in docks:
            v.addAction(d.toggleViewAction())
        self._docks_separator = v.addSeparator()
        h = mb.addMenu("&Help")
        h.addAction(self.act_about)
        self._rebuild_recent_menu()

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

    def _build_status_bar(self) -> None:
        sb = self.statusBar()
        self.state_label = QLabel("idle")
        self.state_label.setObjectName("stateLabel")
        self.step_label = QLabel("")
        self.rate_label = QLabel("")
        self.eta_label = QLabel("")
        self.lr_label = QLabel("")
        self.loss_label = QLabel("")
        self.progress = QProgressBar()
        self.progress.setObjectName("progress")
        self.progress.setFixedWidth(150)
        self.progress.setTextVisible(True)
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        for w in (self.state_label, self.step_label, self.rate_label, self.eta_label, self.lr_label,
                  self.loss_label):
            w.setContentsMargins(6, 0, 6, 0)
            sb.addPermanentWidget(w)
        sb.addPermanentWidget(self.progress)
        self._set_state_text("idle")

    # ---- settings -------------------------------------------------------------------------------
    def _restore_settings(self) -> None:
        s = self._settings
        geo = s.value("geometry")
        if isinstance(geo, (QByteArray, bytes)) and geo:
            self.restoreGeometry(geo)
        else:
            self.resize(1280, 800)
        state = s.value("windowState")
        if isinstance(state, (QByteArray, bytes)) and state:
            self.restoreState(state)
        try:
            smooth = int(s.value("smoothing", 60))
        except (TypeError, ValueError):
            smooth = 60
        self.smoothing.setValue(min(max(smooth, 0), 99))
        self.plots.set_smoothing(self.smoothing.value() / 100)
        for plot, box in self.log_checks.items():
            v = s.value(f"log_{plot}")
            if v is not None:
                box.setChecked(str(v).lower() in ("true", "1"))

    def _save_settings(self) -> None:
        s = self._settings
        s.setValue("geometry", self.saveGeometry())
        s.setValue("windowState", self.saveState())
        s.setValue("smoothing", self.smoothing.value())
        for plot, box in self.log_checks.items():
            s.setValue(f"log_{plot}", box.isChecked())
        s.sync()

    def recent_files(self) -> list[str]:
        value = self._settings.value("recentFiles", [])
        if isinstance(value, str):
            value = [value]
        return [str(v) for v in (value or []) if v]

    def _remember_script(self, path: str) -> None:
        recent = [p for p in self.recent_files() if p != path]
        recent.insert(0, path)
        self._settings.setValue("recentFiles", recent[:MAX_RECENT])
        self._settings.setValue("lastScript", path)
        self._rebuild_recent_menu()

    def _rebuild_recent_menu(self) -> None:
        self.recent_menu.clear()
        recent = self.recent_files()
        for path in recent:
            a = self.recent_menu.addAction(Path(path).name)
            a.setToolTip(path)
            a.setStatusTip(path)
            a.triggered.connect(lambda _=False, p=path: self.load_script(p))
        if recent:
            self.recent_menu.addSeparator()
            self.recent_menu.addAction("Clear list", self._on_clear_recent)
        else:
            a = self.recent_menu.addAction("(none yet)")
            a.setEnabled(False)

    def _on_clear_recent(self) -> None:
        self._settings.setValue("recentFiles", [])
        self._rebuild_recent_menu()

    # ---- messages ------------------------------------------------------------------------------
    def _show_message(self, icon: QMessageBox.Icon, title: str, text: str, detail: str = "") -> QMessageBox:
        """A window-modal message box that does not block the event loop (training keeps being drawn)."""
        self.messages.append((title, text, detail))
        box = QMessageBox(icon, title, text, QMessageBox.StandardButton.Ok, self)
        box.setObjectName("lrvizMessage")
        if detail:
            box.setDetailedText(detail)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.open()
        return box

    def _status(self, text: str, ms: int = 6000) -> None:
        self.statusBar().showMessage(text, ms)

    # ---- scripts -------------------------------------------------------------------------------
    def load_script(self, path: str | os.PathLike[str] | None = None) -> None:
        """Load an experiment script in the background (None: the last one, else the default example).

        On success the controls are filled from its DEFAULTS; on failure the error (file, line,
        cause) is shown and the experiment loaded before stays.
        """
        if self._loader is not None and self._loader.is_alive():
            self._status("still loading the previous script…")
            return
        ref = None if path is None else str(path)
        if ref is None:
            last = self._settings.value("lastScript")
            if last and Path(str(last)).is_file():
                ref = str(last)
        self._loading_path = ref
        self._set_busy(True, f"Loading {Path(ref).name if ref else 'the default example'}…")
        self._loader = threading.Thread(target=self._load_worker, args=(ref,), name="lrviz-loader", daemon=True)
        self._loader.start()

    def _load_worker(self, ref: str | None) -> None:
        exp = err = None
        devices: list[str] = ["auto", "cpu"]
        try:
            from lrviz.devices import available_devices
            from lrviz.experiment import default_experiment_path, load_experiment

            exp = load_experiment(ref if ref is not None else default_experiment_path())
            devices = available_devices()
        except LrvizError as exc:
            err = exc
        except Exception as exc:  # not the script's contract: still a message, not a crash
            err = ScriptError(f"loading failed: {type(exc).__name__}: {exc}", ref)
            err.__cause__ = exc
        try:
            self._scriptLoaded.emit(ref, exp, err, devices)
        except RuntimeError:  # the window is gone
            pass

    def _on_script_loaded(self, ref: str | None, exp: Experiment | None, err: LrvizError | None,
                          devices: list[str]) -> None:
        self._set_busy(False)
        if self._loader is not None:
            self._loader.join(1.0)
        if err is not None or exp is None:
            kept = f"\n\n{self.experiment.path.name} stays loaded." if self.experiment is not None else ""
            self._show_message(QMessageBox.Icon.Critical, "Cannot load the script", f"{err}{kept}",
                               _detail_of(err) if err is not None else "")
            self._status(f"could not load {ref}")
            self.plots.set_hint("" if self.experiment else "No script loaded: File > Open script…")
            self.scriptLoaded.emit("")
            self._update_actions()
            return
        previous = self.experiment
        self.experiment = exp
        if previous is not None and previous.path != exp.path:
            self._forget_shown_runs()
        self.controls.set_devices(devices)
        self.controls.set_experiment(exp)
        try:
            from lrviz.config import RunConfig

            self._start_schedule = RunConfig(**exp.defaults).validated().schedule
        except (LrvizError, TypeError):
            self._start_schedule = None
        self._update_schedule_status()
        self._show_notes(exp)
        self.script_label.setText(f"{exp.path.name}")
        self.script_label.setToolTip(str(exp.path))
        self.setWindowTitle(f"{exp.name} — lrviz")
        self._remember_script(str(exp.path))
        if self.plots.primary is None:
            self.plots.set_hint(f"Press Start (Ctrl+Enter) to train {exp.path.name}")
        self._status(f"loaded {exp.path}")
        self._on_setup_changed()
        self._update_actions()
        self.scriptLoaded.emit(str(exp.path))

    def _forget_shown_runs(self) -> None:
        """Another script was opened: the plots start empty for it (its last run, overlays and legend
        belong to the script before). A run still in progress stays shown until it ends."""
        if self._active() or not self._end_handled:
            return
        self.engine = None
        self._overlay_ids = []
        self.plots.set_overlays([])
        self.plots.set_primary(None)
        self.act_clear_overlays.setEnabled(False)
        self.view_label.setText("")
        self.view_label.setToolTip("")
        self._last_state = ""
        self._set_state_text("idle")
        self._clear_run_labels()

    def _show_notes(self, exp: Experiment) -> None:
        if notes_html is not None:
            try:
                self.notes.setHtml(notes_html(exp))
                return
            except Exception:  # fall back to the plain rendering below
                log.exception("rendering the script notes failed")
        from html import escape

        doc = exp.doc or "This script has no docstring. Add one at the top of the file to note what to try."
        paras = "".join(f"<p>{escape(p).replace(chr(10), ' ')}</p>" for p in doc.split("\n\n"))
        knobs = ""
        if exp.params:
            rows = "".join(f"<li><code>{escape(k)}</code> = {escape(repr(v))}</li>" for k, v in exp.params.items())
            knobs = f"<p><b>Knobs (PARAMS)</b></p><ul>{rows}</ul>"
        defaults = ""
        if exp.defaults:
            items = ", ".join(f"{escape(k)}={escape(str(v))}" for k, v in exp.defaults.items())
            defaults = f"<p style='color:{theme.GREY}'>DEFAULTS: {items}</p>"
        self.notes.setHtml(f"<h3>{escape(exp.path.name)}</h3><p style='color:{theme.GREY}'>"
                           f"{escape(str(exp.path.parent))}</p>{paras}{knobs}{defaults}")

    def _set_busy(self, busy: bool, text: str = "") -> None:
        if busy:
            self.setCursor(Qt.CursorShape.BusyCursor)
            self.progress.setRange(0, 0)
            self._set_state_text("loading")
            self._status(text, 0)
        else:
            self.unsetCursor()
            self.progress.setRange(0, 100)
            self.statusBar().clearMessage()
            self._set_state_text(self.engine.state if self.engine is not None else "idle")

    def _on_open(self) -> None:
        start = str(self.experiment.path.parent) if self.experiment is not None else str(Path.home())
        path, _ = QFileDialog.getOpenFileName(self, "Open experiment script", start, "Python scripts (*.py)")
        if path:
            self.load_script(path)

    def _on_reload(self) -> None:
        if self.experiment is not None:
            self.load_script(str(self.experiment.path))

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802
        if self._dropped_script(event) is not None:
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802
        path = self._dropped_script(event)
        if path is not None:
            event.acceptProposedAction()
            self.load_script(path)

    @staticmethod
    def _dropped_script(event: Any) -> str | None:
        mime = event.mimeData()
        if not mime.hasUrls():
            return None
        for url in mime.urls():
            if url.isLocalFile() and url.toLocalFile().endswith(".py"):
                return url.toLocalFile()
        return None

    # ---- running --------------------------------------------------------------------------------
    def _active(self) -> bool:
        """Whether a run is in progress (preparing, running or paused)."""
        eng = self.engine
        return eng is not None and eng.state not in TERMINAL and (eng.is_alive or eng.state == "idle")

    def is_active(self) -> bool:
        """Whether a run is in progress (preparing, running or paused)."""
        return self._active()

    def start_schedule(self) -> str | None:
        """The schedule a run started now would use (applied before the start, or the script's)."""
        return self._start_schedule

    def start_run(self, paused: bool = False) -> bool:
        """Start training the loaded script with the controls' settings; False when refused."""
        exp = self.experiment
        if exp is None or self._active():
            return False
        try:
            cfg = self.controls.config(exp, self._start_schedule)
        except ConfigError as exc:
            self._status(f"cannot start: {exc}", 10000)
            return False
        from lrviz.engine import TrainingEngine

        kwargs: dict[str, Any] = {}
        run_exp = exp
        try:
            if self.lab is not None:
                run_exp, cfg, kwargs = self.lab.prepare_run(exp, cfg)
            eng = TrainingEngine(run_exp, cfg, self.store, start_paused=paused, **kwargs)
        except LrvizError as exc:
            self.controls.config_errors.show_error(str(exc))
            self._status(f"cannot start: {exc}", 10000)
            return False
        label = (f"training {exp.path.name}: {cfg.optimizer} lr={format_number(cfg.lr)}"
                 + (f", {cfg.schedule}" if cfg.schedule else ""))
        if not self.start_engine(eng, label):
            return False
        if paused:
            eng.step_once()
            self._pause_asked = True
            self._update_actions()
        return True

    def start_engine(self, engine: TrainingEngine, label: str = "") -> bool:
        """Show ``engine`` (prepared, not started) as the live run and start it; False when refused."""
        if self._active():
            self._status("a run is in progress: stop it first")
            return False
        self.engine = engine
        eng = engine
        self._end_handled = False
        self._pause_asked = False
        self._last_state = ""
        self.view_label.setText("")
        trace = RunTrace(lambda: eng.buffer, eng.events, eng.validation, label="this run",
                         smoothing=self.plots.smoothing, live=True)
        self.plots.set_primary(trace)
        self.plots.set_hint("")
        if self._overlay_ids:
            self.overlay_runs(self._overlay_ids)  # keep the compared runs, now over the live one
        eng.start()
        self.controls.set_running(True)
        self._timer.start()
        self._listed_run = False
        self._update_actions()
        if label:
            self._status(label)
        self.runStarted.emit(eng)
        return True

    def show_status(self, text: str, ms: int = 8000) -> None:
        """A message in the status bar."""
        self._status(text, ms)

    def refresh_runs(self) -> None:
        """Read the run list of the run browser again."""
        self._refresh_runs()

    def refresh_actions(self) -> None:
        """Enable and name the run buttons for the current state (after a panel changed it)."""
        self._update_actions()

    def _on_pause_resume(self) -> None:
        eng = self.engine
        if not self._active():
            self.start_run()
            return
        assert eng is not None
        if eng.state == "paused" or self._pause_asked:
            self.resume()
            self._status("resumed")
        else:
            self.pause()
            self._status("pausing before the next step")
        self._update_actions()

    def pause(self) -> None:
        """Pause the live run before its next step."""
        if self._active() and self.engine is not None:
            self._pause_asked = True
            self.engine.pause()

    def resume(self) -> None:
        """Resume the paused run."""
        if self._active() and self.engine is not None:
            self._pause_asked = False
            self.engine.resume()

    def _on_step(self) -> None:
        if self._active():
            assert self.engine is not None
            self._pause_asked = True  # it pauses again after the step
            self.engine.step_once()
        else:
            self.start_run(paused=True)

    def stop_run(self) -> None:
        if self._active() and self.engine is not None:
            self.engine.stop()
            self._status("stopping…")

    def _on_lr_committed(self, lr: float) -> None:
        eng = self.engine
        if self._active() and eng is not None:
            try:
                eng.set_lr(lr)
            except ConfigError as exc:
                self.controls.lr.show_error(str(exc))
                return
            self._status(f"learning rate {format_number(lr)} from step {eng.step}")
        else:
            self._status(f"learning rate {format_number(lr)} at the start")
            self._on_setup_changed()

    def _on_schedule_applied(self, spec: str) -> None:
        eng = self.engine
        text = spec or None
        if self._active() and eng is not None:
            try:
                eng.set_schedule(text)
            except ConfigError as exc:
                self.controls.schedule.show_error(str(exc))
                return
            self.controls.schedule.set_status(f"In force from step {eng.step}: {text or 'none (constant rate)'}")
            self._status(f"schedule {text or 'none'} from step {eng.step}")
        else:
            self._start_schedule = text
            self._update_schedule_status()
            self._status(f"schedule at the start: {text or 'none'}")

    def _update_schedule_status(self) -> None:
        self.controls.schedule.set_status(f"At the start: {self._start_schedule or 'none (constant rate)'}")

    def _on_hyperparams_applied(self, values: dict[str, float]) -> None:
        eng = self.engine
        if not (self._active() and eng is not None):
            return
        try:
            eng.set_hyperparams(**values)
        except ConfigError as exc:
            field = self.controls.momentum if "momentum" in str(exc) else self.controls.weight_decay
            field.set_error(str(exc))
            return
        self._status("momentum {momentum:g}, weight decay {weight_decay:g} from step ".format(**values)
                     + str(eng.step))

    def _on_setup_changed(self, *_: object) -> None:
        """Before a run: the schedule preview follows the rate and length in the controls."""
        if self._active():
            return
        try:
            lr = self.controls.lr.value()
        except ConfigError:
            return
        remaining = self.controls.length.value() if self.controls.length_kind.currentText() == "steps" else None
        self.controls.schedule.set_context([lr], 0, remaining)

    # ---- the timer -------------------------------------------------------------------------------
    def _on_tick(self) -> None:
        if self._closed:
            self._timer.stop()
            return
        self._ticks += 1
        self.plots.refresh()
        # wake up no more often than the plots may redraw (each wake-up takes the GIL from training)
        interval = max(TICK_MS, min(150, int(1000 * self.plots.min_frame_interval())))
        if abs(interval - self._timer.interval()) > 4:
            self._timer.setInterval(interval)
        eng = self.engine
        if eng is None:
            self._timer.stop()
            return
        now = time.monotonic()
        if now - self._status_at >= STATUS_EVERY_S or eng.state != self._last_state:
            self._status_at = now
            self._update_status(eng)
        if eng.state in TERMINAL and not eng.is_alive and not self._end_handled:
            self._on_run_ended()

    def _update_status(self, eng: TrainingEngine) -> None:
        state = eng.state
        if state != self._last_state:
            self._last_state = state
            self._set_state_text(state)
            self._update_actions()
        step = eng.step
        total = eng.total_steps
        self.step_label.setText(f"step {step:,}" + (f" / {total:,}" if total else ""))
        rate = self._steps_per_second(eng)
        self.rate_label.setText(f"{rate:,.0f} steps/s" if rate else "")
        if total and rate and state == "running":
            self.eta_label.setText(f"ETA {_fmt_duration(max(0, total - step) / rate)}")
        else:
            self.eta_label.setText("")
        if eng.lrs:
            self.lr_label.setText("lr " + ", ".join(format_number(x) for x in eng.lrs[:3]))
        buf = eng.buffer
        if buf is not None and len(buf):
            n = len(buf)
            last = buf.view(n - 1, n)
            # the epoch of the last step taken (the engine's counter moves past the last epoch at the end)
            epoch = f"epoch {int(last['epoch'][0]) + 1}"
            if eng.config.epochs:
                epoch += f" of {eng.config.epochs:,}"
            self.loss_label.setText(f"loss {format_number(float(last['loss'][0]), 4)} · {epoch}")
        if total:
            self.progress.setValue(int(100 * min(step, total) / total))
            self.progress.setFormat(f"{100 * min(step, total) / total:.0f}%")
        now = time.monotonic()
        if state in ("running", "paused") and now - self._context_at >= CONTEXT_EVERY_S:
            self._context_at = now
            sched_total = None if total is None else max(1, total - step)
            self.controls.schedule.set_context(list(eng.lrs) or [0.01], step, sched_total)
        if eng.run_id is not None and self.plots.primary is not None:
            self.plots.primary.trace.run_id = eng.run_id
        if eng.run_id is not None and (not self._listed_run or now - self._runs_at >= RUNS_REFRESH_S):
            self._listed_run = True  # listed as soon as it exists, then its steps every few seconds
            self._runs_at = now
            self._refresh_runs()

    @staticmethod
    def _steps_per_second(eng: TrainingEngine) -> float | None:
        buf = eng.buffer
        if buf is None or len(buf) < 2 or eng.state != "running":
            return None
        n = len(buf)
        t = buf.view(max(0, n - 20000), n)["time"]
        i = int(np.searchsorted(t, t[-1] - 2.0))
        dt = float(t[-1] - t[i])
        return (len(t) - 1 - i) / dt if dt > 0 else None

    def _set_state_text(self, state: str) -> None:
        colour = STATE_COLOURS.get(state, theme.BLACK)
        self.state_label.setText(f"<b style='color:{colour}'>{state}</b>")

    def _on_run_ended(self) -> None:
        eng = self.engine
        assert eng is not None
        self._end_handled = True
        self._timer.stop()
        self.plots.refresh(force=True)
        self._update_status(eng)
        self.controls.set_running(False)
        self._update_actions()
        self._on_setup_changed()
        self._update_schedule_status()
        summary = eng.summary()
        run = f"run #{eng.run_id}" if eng.run_id is not None else "the run"
        final = summary.get("final_loss")
        tail = f", final loss {format_number(final, 4)}" if isinstance(final, float) else ""
        if eng.state == "failed":
            self._show_message(QMessageBox.Icon.Critical, "Training failed",
                               f"{eng.error}\n\nThe run was saved as failed; the app keeps running.",
                               eng.error_detail)
        elif eng.state == "diverged":
            self._show_message(QMessageBox.Icon.Warning, "Training diverged",
                               f"{eng.error}\n\nTraining was stopped at step {eng.step}; lower the "
                               "learning rate and start again.", eng.error_detail)
        self._status(f"{run} {eng.state} after {eng.step:,} steps{tail}", 15000)
        self._refresh_runs()
        self.runEnded.emit(eng.state)

    def _refresh_runs(self) -> None:
        if self.run_browser is not None and not self._closed:
            try:
                self.run_browser.refresh()
            except Exception as exc:  # the browser is another module: never let it break a run's end
                log.warning("refreshing the run browser failed: %s", exc)

    def _clear_run_labels(self) -> None:
        for w in (self.step_label, self.rate_label, self.eta_label, self.lr_label, self.loss_label):
            w.setText("")
        self.progress.setValue(0)
        self.progress.setFormat("")

    def _update_actions(self) -> None:
        eng = self.engine
        active = self._active()
        state = eng.state if eng is not None else "idle"
        loaded = self.experiment is not None
        self.act_start.setEnabled(loaded and not active)
        self.act_step.setEnabled((loaded and not active) or state == "paused")
        self.act_stop.setEnabled(active)
        paused = active and eng is not None and (state == "paused" or self._pause_asked)
        sp = QStyle.StandardPixmap
        if paused:
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

    # ---- stored runs --------------------------------------------------------------------------------
    def _stored_trace(self, run_id: int) -> RunTrace:
        assert self.store is not None
        info = self.store.get_run(run_id)
        steps = self.store.load_steps(info.id)
        first = int(steps["step"][0]) if len(steps.get("step", ())) else 0
        buf = StepBuffer.from_columns(steps, first_step=first)
        return RunTrace(buf, self.store.load_events(info.id), self.store.load_validation(info.id),
                        label=f"#{info.id} {self._run_label(info)}", run_id=info.id, smoothing=self.plots.smoothing)

    @staticmethod
    def _run_label(info: Any) -> str:
        name = str(info.name or "")
        cfg = info.config or {}
        lr = cfg.get("lr")
        extra = []
        if lr is not None:
            extra.append(f"lr {format_number(float(lr))}")
        if cfg.get("schedule"):
            extra.append(str(cfg["schedule"]).split(":")[0])
        stem = name.split(" #")[0] if " #" in name else name
        return f"{stem} ({', '.join(extra)})" if extra else stem

    def open_run(self, run_id: int) -> None:
        """Show a stored run in the plots (overlaid instead while a run is live)."""
        if self.store is None:
            return
        if self._active():
            self.overlay_runs([*self._overlay_ids, int(run_id)])
            self._status(f"run #{run_id} overlaid (a run is in progress)")
            return
        try:
            trace = self._stored_trace(int(run_id))
            info = self.store.get_run(int(run_id))
        except LrvizError as exc:
            self._show_message(QMessageBox.Icon.Warning, "Cannot open the run", str(exc), _detail_of(exc))
            return
        self.engine = None
        self._overlay_ids = []
        self.plots.set_overlays([])  # an opened run is shown alone
        self.act_clear_overlays.setEnabled(False)
        self.plots.set_primary(trace)
        self.plots.set_hint("")
        self.plots.refresh(force=True)
        self.view_label.setText(f"viewing run #{info.id} {info.name} ({info.status})")
        self._set_state_text("viewing")
        self._clear_run_labels()
        self.step_label.setText(f"{info.steps:,} steps")
        if info.final_loss is not None:
            self.loss_label.setText(f"final loss {format_number(info.final_loss, 4)}")
        self._update_actions()

    def overlay_runs(self, run_ids: list[int]) -> None:
        """Draw stored runs together, each in its own colour with a legend entry.

        While a run is live it stays drawn and the runs are overlaid on it; otherwise exactly the
        given runs are shown (an empty list removes the overlays).
        """
        if self.store is None:
            return
        live = self._active()
        if not live and run_ids and self.plots.primary is not None:
            self.plots.set_primary(None)
        primary_id = self.plots.primary.trace.run_id if self.plots.primary is not None else None
        traces = []
        ids: list[int] = []
        for rid in run_ids:
            rid = int(rid)
            if rid == primary_id or rid in ids:
                continue
            try:
                traces.append(self._stored_trace(rid))
                ids.append(rid)
            except LrvizError as exc:
                self._status(f"cannot overlay run #{rid}: {exc}")
        self._overlay_ids = ids
        self.plots.set_overlays(traces)
        self.plots.refresh(force=True)
        self.act_clear_overlays.setEnabled(bool(ids))
        if ids:
            runs = ", ".join(f"#{i}" for i in ids)  # short first: the legend names each run
            self.view_label.setText(f"+{len(ids)} overlaid ({runs})" if live else f"{len(ids)} runs ({runs})")
            if not live:
                self._set_state_text("viewing")
                self._clear_run_labels()
                self.step_label.setText(f"{len(ids)} runs")
        else:
            self.view_label.setText("")
        self._update_actions()

    # ---- export -----------------------------------------------------------------------------------
    def _primary_records(self) -> dict[str, Any] | None:
        """Full-fidelity records of the primary run: steps, events, validation, run info, config."""
        item = self.plots.primary
        if item is None:
            return None
        tr = item.trace
        eng = self.engine
        if tr.live and eng is not None:
            steps = eng.buffer.view() if eng.buffer is not None else {}
            run: dict[str, Any] = {"id": eng.run_id, "name": None, "script_path": str(eng.experiment.path),
                                   "status": eng.state, "device": str(eng.device)}
            if eng.run_id is not None and self.store is not None:
                try:
                    from lrviz.export import run_record

                    run = run_record(self.store.get_run(eng.run_id))
                    run["status"] = eng.state
                except LrvizError:
                    pass
            return {"steps": steps, "events": list(eng.events), "validation": list(eng.validation),
                    "run": run, "config": eng.config.to_dict(), "summary": eng.summary(),
                    "label": run.get("name") or eng.experiment.name}
        if tr.run_id is not None and self.store is not None:
            from lrviz.export import run_record

            info = self.store.get_run(tr.run_id)
            return {"steps": self.store.load_steps(info.id), "events": self.store.load_events(info.id),
                    "validation": self.store.load_validation(info.id), "run": run_record(info),
                    "config": info.config, "summary": info.summary, "label": info.name}
        return None

    def _export_target(self, caption: str, filters: list[tuple[str, str]], stem: str) -> tuple[str, str] | None:
        start = str(Path(self._settings.value("exportDir", str(Path.home()))) / stem)
        path, chosen = QFileDialog.getSaveFileName(self, caption, start, ";;".join(f for f, _ in filters))
        if not path:
            return None
        path, fmt = export_path(path, chosen, filters)
        self._settings.setValue("exportDir", str(Path(path).parent))
        return path, fmt

    def _on_export_plot(self) -> None:
        rec = self._primary_records()
        if rec is None and not self.plots.overlays:
            return
        stem = str(rec["label"]) if rec is not None else "comparison"
        target = self._export_target("Export plot", [("PNG image (*.png)", "png"), ("SVG image (*.svg)", "svg"),
                                                     ("PDF document (*.pdf)", "pdf")], f"{stem}.png")
        if target is not None:
            self.export_plot(*target)

    def plot_description(self) -> tuple[list[Any], Any]:
        """What the plots show now, as the renderer takes it: the runs (every step, from the engine or
        the store, in their screen colours) and the :class:`lrviz.export.FigureSpec` (panels, smoothing,
        log axes, the steps in view, a title)."""
        from lrviz.export import describe_run

        from . import render

        rec = self._primary_records()
        runs = []
        if rec is not None:
            runs.append(render.RunData(label=str(rec["label"]), steps=rec["steps"], events=rec["events"],
                                       validation=rec["validation"]))
        for item in self.plots.overlays:
            rid = item.trace.run_id
            try:  # drawn as on screen: in its colour, its events not marked
                runs.append(render.RunData.from_store(self.store, rid, label=item.trace.label, colour=item.colour,
                                                      marked=False))
            except LrvizError as exc:
                self._status(f"run #{rid} left out: {exc}")
        if len(runs) > 1 or rec is None:
            title = "comparison of " + ", ".join(r.label.split(" (")[0] for r in runs)
        else:
            title = describe_run(rec["run"], rec["config"])
        return runs, self.plots.figure_spec(title)

    def export_plot(self, path: str, fmt: str) -> bool:
        """Render what the plots show (the primary run and the overlays, every step; the same panels,
        smoothing, log axes, markers and steps in view) to ``path`` as png, svg or pdf."""
        try:
            from . import render
        except ImportError as exc:
            self._show_message(QMessageBox.Icon.Warning, "Export unavailable", f"plot export is missing: {exc}")
            return False
        runs, figure = self.plot_description()
        if not runs:
            return False
        try:
            render.render_run(runs, path, fmt, figure=figure)
        except (LrvizError, OSError) as exc:
            self._show_message(QMessageBox.Icon.Warning, "Export failed", str(exc), _detail_of(exc))
            return False
        self._status(f"saved {path}")
        return True

    def _on_export_data(self) -> None:
        rec = self._primary_records()
        if rec is None:
            return
        target = self._export_target("Export data", [("CSV, every step (*.csv)", "csv"),
                                                     ("JSON, run and events (*.json)", "json")],
                                     f"{rec['label']}.csv")
        if target is not None:
            self.export_data(*target)

    def export_data(self, path: str, fmt: str) -> bool:
        """Write the shown run's every step as CSV (``fmt='csv'``) or the run as JSON (``'json'``)."""
        rec = self._primary_records()
        if rec is None:
            return False
        from lrviz.export import write_metrics_csv, write_run_json

        try:
            if fmt == "csv":
                write_metrics_csv(path, rec["steps"], rec["validation"])
            else:
                write_run_json(path, run=rec["run"], config=rec["config"], events=rec["events"],
                               validation=rec["validation"], summary=rec["summary"])
        except (LrvizError, OSError) as exc:
            self._show_message(QMessageBox.Icon.Warning, "Export failed", str(exc), _detail_of(exc))
            return False
        self._status(f"saved {path}")
        return True

    # ---- misc ------------------------------------------------------------------------------------
    def _on_smoothing_moved(self, value: int) -> None:
        self.smoothing_label.setText(f"smoothing {value / 100:.2f}")
        self._smooth_timer.start()

    def _on_smoothing_settled(self) -> None:
        self.plots.set_smoothing(self.smoothing.value() / 100)
        self.plots.refresh(force=True)

    def _on_about(self) -> None:
        from lrviz import __version__

        QMessageBox.about(self, "About lrviz", f"<b>lrviz {__version__}</b><p>A learning-rate laboratory for "
                          "PyTorch: watch loss and learning rate live, pause, change the rate or the schedule, "
                          "resume, compare runs.</p>")

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802
        eng = self.engine
        if self._active() and eng is not None:
            answer = QMessageBox.question(
                self, "Training is running",
                "Stop training and close lrviz?\n\nThe run so far is saved in the run store.",
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
            if answer != QMessageBox.StandardButton.Yes:
                event.ignore()
                return
            self.shutdown_engine()
        self._closed = True
        self._timer.stop()
        if self.lab is not None:
            self.lab.shutdown()
        if self._loader is not None:
            self._loader.join(10.0)
        self._save_settings()
        if self.store is not None and (self.engine is None or not self.engine.is_alive):
            self.store.close()
        event.accept()

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop everything that runs in a thread (the live run, the lab's range test or sweep) and wait."""
        if self.lab is not None:
            self.lab.shutdown(timeout)
        ok = self.shutdown_engine(timeout)
        if self._loader is not None:
            self._loader.join(timeout)
        return ok

    def shutdown_engine(self, timeout: float = 30.0) -> bool:
        """Stop the live run and wait until its thread has ended (it stops within a step)."""
        eng = self.engine
        if eng is None:
            return True
        eng.stop()
        deadline = time.monotonic() + timeout
        eng.join(timeout)
        while eng.is_alive and time.monotonic() < deadline:
            time.sleep(0.005)
        if not eng.is_alive and not self._end_handled:
            self._end_handled = True
        return not eng.is_alive
