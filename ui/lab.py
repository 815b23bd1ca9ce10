"""The learning-rate lab: the panels that make the rate's effects visible, wired into the main window.

:class:`Lab` owns the panels (range test, sweep, 2-D surface, diagnostics, fork and resume), the
divergence banner above the plots and the guard options in the controls, and one 30 Hz timer that
updates them while anything is live (a run, a range test, a sweep). Background work (a range test
on a fresh model, a sweep) runs in plain threads; the timer hands its results to the widgets on
the GUI thread. The panels reach the app only through the methods here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from PySide6.QtCore import QObject, Qt, QTimer
from PySide6.QtWidgets import QTabBar

from lrviz.errors import LrvizError

from . import _compat  # noqa: F401  (must run first: PySide6 6.12 signal refcount defect)
from .lab_common import TERMINAL, surface_of
from .lab_diagnostics import DiagnosticsPanel
from .lab_fork import ForkPanel
from .lab_guard import DivergenceBanner, RunOptions
from .lab_range_test import RangeTestPanel
from .lab_surface import SurfacePanel
from .lab_sweep import SweepPanel

if TYPE_CHECKING:
    from lrviz.config import RunConfig
    from lrviz.engine import TrainingEngine
    from lrviz.experiment import Experiment

    from .main_window import MainWindow

log = logging.getLogger(__name__)

TICK_MS = 33
#: Ticks the timer keeps running after the last live thing ended (so the final state is drawn).
LINGER_TICKS = 3


class _EngineSource:
    """Diagnostics data of a live (or just ended) engine."""

    def __init__(self, engine: TrainingEngine):
        from .lab_surface import run_label

        self.engine = engine
        self.validation = engine.validation
        self.has_validation = True
        self.label = "previous: " + run_label(engine.config)

    def steps(self) -> tuple[np.ndarray, np.ndarray]:
        buf = self.engine.buffer
        if buf is None or not len(buf):
            return np.zeros(0, np.int64), np.zeros(0)
        v = buf.view()
        return np.asarray(v["step"]), np.asarray(v["loss"])

    def layers(self) -> dict[str, Any] | None:
        probe = self.engine.layer_probe
        return probe.as_arrays() if probe is not None else None


class _StoredSource:
    """Diagnostics data of a stored run (no per-layer statistics: they are not stored)."""

    def __init__(self, store: Any, run_id: int):
        self.run_id = run_id
        data = store.load_steps(run_id)
        self._steps = np.asarray(data.get("step", np.zeros(0, np.int64)))
        self._loss = np.asarray(data.get("loss", np.zeros(0)))
        self.validation = store.load_validation(run_id)
        self.has_validation = bool(self.validation)

    def steps(self) -> tuple[np.ndarray, np.ndarray]:
        return self._steps, self._loss

    def layers(self) -> dict[str, Any] | None:
        return None


class Lab(QObject):
    """The lab panels of one main window and the glue between them and the window."""

    PANELS = (("Range test", "rangeTestDock"), ("Sweep", "sweepDock"), ("Surface", "surfaceDock"),
              ("Diagnostics", "diagnosticsDock"), ("Fork / resume", "forkDock"))

    def __init__(self, window: MainWindow):
        super().__init__(window)
        self.window = window
        #: Slow motion for 2-D surface runs: at most this many steps a second (None: full speed).
        self.pace: float | None = None
        self.options = RunOptions()
        self.banner = DivergenceBanner(self)
        self.range_test = RangeTestPanel(self)
        self.sweep = SweepPanel(self)
        self.surface = SurfacePanel(self)
        self.diagnostics = DiagnosticsPanel(self)
        self.fork = ForkPanel(self)
        self.docks: dict[str, Any] = {}
        self._source: Any = None
        self._source_key: Any = None
        self._linger = 0
        self._last_state = ""
        self._script_path: str | None = None
        self._timer = QTimer(self)
        self._timer.setInterval(TICK_MS)
        self._timer.timeout.connect(self._on_tick)

    # ---- installing ---------------------------------------------------------------------------------
    def install(self) -> None:
        """Add the panels as docks, the banner above the plots and the options to the controls."""
        w = self.window
        widgets = (self.range_test, self.sweep, self.surface, self.diagnostics, self.fork)
        for (title, name), widget in zip(self.PANELS, widgets):
            self.docks[title] = w.add_panel(title, widget, name)
        w.add_banner(self.banner)
        w.controls.add_section(self.options)
        w.runStarted.connect(self._on_run_started)
        w.runEnded.connect(self._on_run_ended)
        w.scriptLoaded.connect(self._on_script_loaded)
        browser = getattr(w, "run_browser", None)
        if browser is not None:
            browser.view.selectionModel().selectionChanged.connect(self._on_browser_selection)
        if w.runs_dock is not None:
            w.runs_dock.raise_()
        self.unelide_tabs()

    def unelide_tabs(self) -> None:
        """Dock tabs show their whole titles (and scroll when they do not fit) instead of "Ran…", "S…"."""
        for bar in self.window.findChildren(QTabBar):
            if bar.parent() is self.window:  # the main window's own dock tab bars
                bar.setElideMode(Qt.TextElideMode.ElideNone)
                bar.setUsesScrollButtons(True)

    def show_panel(self, title: str) -> None:
        """Bring a panel's dock to the front."""
        dock = self.docks.get(title)
        if dock is not None:
            dock.show()
            dock.raise_()

    # ---- what the panels ask of the app -----------------------------------------------------------------
    @property
    def experiment(self) -> Experiment | None:
        return self.window.experiment

    @property
    def engine(self) -> TrainingEngine | None:
        return self.window.engine

    @property
    def store(self) -> Any:
        return self.window.store

    def active(self) -> bool:
        """Whether the window's run is in progress (preparing, running or paused)."""
        return self.window.is_active()

    def app_config(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` with the app's guard policy, checkpoint interval and early stopping."""
        return self.options.apply(cfg)

    def run_config(self) -> RunConfig:
        """The configuration the Start button would use now (raises ConfigError when a field is wrong)."""
        w = self.window
        exp = w.experiment
        if exp is None:
            raise LrvizError("load a script first")
        return self.app_config(w.controls.config(exp, w.start_schedule()))

    def engine_kwargs(self) -> dict[str, Any]:
        """Extra TrainingEngine arguments of app runs (per-layer statistics)."""
        return self.options.engine_kwargs()

    def run_pace(self, exp: Experiment, params: dict[str, Any] | None = None) -> float | None:
        """The slow-motion pace for a run of ``exp``: the surface view's, for scripts it can draw."""
        return self.pace if surface_of(exp, params) is not None else None

    def set_pace(self, steps_per_s: float | None) -> None:
        """Slow motion (the surface view's pace): new surface runs, and the live one, at most this fast."""
        self.pace = steps_per_s
        eng = self.engine
        if eng is not None and self.active() and surface_of(eng.experiment, eng.config.params) is not None:
            eng.set_pace(steps_per_s)

    def prepare_run(self, exp: Experiment, cfg: RunConfig) -> tuple[Experiment, RunConfig, dict[str, Any]]:
        """What the window's Start uses: the experiment, the configuration with the app's options (and
        the slow-motion pace for a 2-D surface), and extra engine arguments."""
        cfg = self.app_config(cfg)
        cfg.pace = self.run_pace(exp, cfg.params)
        return exp, cfg.validated(), self.engine_kwargs()

    def script_params(self) -> dict[str, Any]:
        """The script knobs as set in the controls (those that parse)."""
        out: dict[str, Any] = {}
        for name, (_widget, default) in self.window.controls.param_fields.items():
            try:
                out[name] = self.window.controls.param_value(name)
            except LrvizError:
                out[name] = default
        return out

    def use_lr(self, lr: float) -> None:
        """Set the learning rate as if typed in the LR control (mid-run: from the next step)."""
        lr_control = self.window.controls.lr
        lr_control.set_value(lr)
        lr_control.set_button.click()

    def show_lr(self, lr: float) -> None:
        """Show the rate the engine uses now in the LR control (after a roll-back), without sending it."""
        self.window.controls.lr.set_value(lr)

    def apply_schedule(self, spec: str) -> None:
        """Apply a schedule as if picked in the schedule editor (mid-run: from the next step)."""
        editor = self.window.controls.schedule
        editor.set_spec(spec)
        editor.apply_button.click()

    def resume(self) -> None:
        """Resume the window's paused run (as its Resume button does)."""
        self.window.resume()

    def start_engine(self, engine: TrainingEngine, label: str) -> bool:
        """Show and start a prepared engine (a fork or a resume) as the window's live run."""
        return self.window.start_engine(engine, label)

    def overlay(self, run_ids: list[int]) -> None:
        self.window.overlay_runs(run_ids)

    def status(self, text: str) -> None:
        self.window.show_status(text)

    def refresh_runs(self) -> None:
        self.window.refresh_runs()
        self.fork.refresh()

    def refresh_actions(self) -> None:
        self.window.refresh_actions()

    def load_script(self, path: str) -> None:
        self.window.load_script(path)

    # ---- the timer ------------------------------------------------------------------------------------
    def wake(self) -> None:
        """Start the timer (it stops by itself once nothing is live)."""
        self._linger = LINGER_TICKS
        if not self._timer.isActive():
            self._timer.start()
        self._on_tick()

    def _live(self) -> bool:
        eng = self.engine
        engine_live = eng is not None and (eng.state not in TERMINAL or eng.is_alive)
        return engine_live or self.range_test.busy() or self.sweep.busy()

    def _on_tick(self) -> None:
        eng = self.engine
        try:
            self.banner.tick(eng)
            self.range_test.tick()
            self.sweep.tick()
            self.surface.tick()
            self.diagnostics.tick(self.diagnostics_source())
            state = eng.state if eng is not None else ""
            if state != self._last_state:
                self._last_state = state
                self.fork.update_mode()
                self.options.set_running(self.active())
        except Exception:  # a panel's bug must not stop the others or the app
            log.exception("a lab panel failed to update")
        if self._live():
            self._linger = LINGER_TICKS
        else:
            self._linger -= 1
            if self._linger <= 0:
                self._timer.stop()

    def diagnostics_source(self) -> Any:
        """The run the diagnostics panel shows: the window's engine, else the stored run it shows."""
        eng = self.engine
        key: Any = None
        if eng is not None:
            key = ("engine", id(eng))
        else:
            primary = self.window.plots.primary
            rid = primary.trace.run_id if primary is not None else None
            if rid is not None and self.store is not None:
                key = ("stored", rid)
        if key != self._source_key:
            self._source_key = key
            self._source = None
            if key is not None and key[0] == "engine":
                self._source = _EngineSource(eng)  # type: ignore[arg-type]
            elif key is not None:
                try:
                    self._source = _StoredSource(self.store, key[1])
                except LrvizError as exc:
                    log.warning("cannot read run #%s for diagnostics: %s", key[1], exc)
        return self._source

    # ---- window events ----------------------------------------------------------------------------------
    def _on_run_started(self, engine: Any) -> None:
        self.options.set_running(True)
        self.range_test.update_mode()
        self.fork.update_mode()
        self.wake()

    def _on_run_ended(self, state: str) -> None:
        self.options.set_running(False)
        self.wake()
        self.diagnostics.refresh()
        self.fork.refresh()

    def _on_script_loaded(self, path: str) -> None:
        if path and path != self._script_path:
            if self._script_path is not None and self.engine is None:  # the window forgot the last run
                self._source, self._source_key = None, None
                self.diagnostics.forget()  # its "previous" line belongs to the script before
            self._script_path = path
        self.range_test.update_mode()
        self.sweep.update_mode()
        self.wake()

    def _on_browser_selection(self, *_: Any) -> None:
        browser = self.window.run_browser
        ids = browser.selected_run_ids() if browser is not None else []
        if len(ids) == 1:
            self.fork.select_run(ids[0])

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel a range test or sweep in progress and wait for their threads."""
        self.range_test.shutdown(timeout)
        self.sweep.shutdown(timeout)
        self._timer.stop()
