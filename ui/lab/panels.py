"""The learning-rate lab: the panels that make the rate's effects visible, wired into the main window.

Every panel is one entry of :data:`PANELS` (its key, dock title, dock name and class); the lab builds
each, docks it, and calls it from the window's one redraw timer (``tick(run)``) and when the window
shows another run or loads another script. The divergence banner above the plots and the guard
options in the controls are the lab's too.

The lab reaches the window only through :class:`LabWindow` (the seam the window offers) and runs only
through the :class:`~lrviz.live.run.Run` interface: a panel never sees an engine, and nothing here
imports torch. Runs a panel starts of its own (a range test on a fresh model, sweep members, forks)
are child processes started with ``window.start_run(spec)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from PySide6.QtCore import QObject, Qt
from PySide6.QtWidgets import QTabBar

from lrviz.config import RunConfig
from lrviz.errors import LrvizError

from .common import LabPanel, is_live, same_script, surface_for
from .diagnostics import DiagnosticsPanel
from .fork import ForkPanel
from .guard import DivergenceBanner, RunOptions
from .range_test import RangeTestPanel
from .surface import SurfacePanel
from .sweep import SweepPanel

if TYPE_CHECKING:
    from lrviz.live.child import ChildRun
    from lrviz.live.run import Run
    from lrviz.scriptinfo import ScriptInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Panel:
    """One lab panel: ``lab.<key>`` is its widget, docked as ``title`` (object name ``dock``)."""

    key: str
    title: str
    dock: str
    cls: type[LabPanel]


#: The lab's panels, in the order their docks are added. Adding a panel is one entry here.
PANELS: tuple[Panel, ...] = (
    Panel("range_test", "Range test", "rangeTestDock", RangeTestPanel),
    Panel("sweep", "Sweep", "sweepDock", SweepPanel),
    Panel("surface", "Surface", "surfaceDock", SurfacePanel),
    Panel("diagnostics", "Diagnostics", "diagnosticsDock", DiagnosticsPanel),
    Panel("fork", "Fork / resume", "forkDock", ForkPanel),
)


class LabWindow(Protocol):
    """What the lab asks of the main window (its seam, see :class:`lrviz.ui.main_window.MainWindow`).

    ``run`` and ``runChanged``; ``script_info`` and ``scriptChanged``; ``config()``; ``run_spec(config,
    **extra)``; ``start_run(spec, show=)``; ``add_spec_hook`` (the lab's options go into every Start);
    the redraw timer: ``ticked``, ``tick_while``, ``wake``; ``store``, ``shown_run_id``; ``add_panel``,
    ``add_banner``, ``controls`` (``add_section``, the LR and schedule fields), ``show_status``,
    ``refresh_runs``, ``overlay_runs``, ``load_script``, ``run_browser`` (its selection).
    """

    run: Run | None
    script_info: ScriptInfo | None
    store: Any
    controls: Any
    shown_run_id: int | None

    def config(self) -> RunConfig: ...
    def run_spec(self, config: RunConfig, **extra: Any) -> dict[str, Any]: ...
    def start_run(self, spec: dict[str, Any], *, show: bool = True) -> ChildRun: ...
    def add_spec_hook(self, fn: Any) -> None: ...
    def tick_while(self, busy: Any) -> None: ...
    def wake(self) -> None: ...
    def add_panel(self, title: str, widget: Any, name: str) -> Any: ...
    def add_banner(self, widget: Any) -> None: ...


class Lab(QObject):
    """The lab panels of one main window and the glue between them and the window."""

    def __init__(self, window: Any):
        super().__init__(window)
        self.window = window
        #: Slow motion for 2-D surface runs: at most this many steps a second (None: full speed).
        self.pace: float | None = None
        self.options = RunOptions()
        self.banner = DivergenceBanner(self)
        self.panels: dict[str, LabPanel] = {}
        for entry in PANELS:
            panel = entry.cls(self)
            self.panels[entry.key] = panel
            setattr(self, entry.key, panel)
        self.docks: dict[str, Any] = {}
        self._active = False

    # ---- installing ---------------------------------------------------------------------------------
    def install(self) -> None:
        """Dock the panels, put the banner above the plots and the options into the controls, and
        follow the window: its runs, its scripts and its redraw timer."""
        w = self.window
        for entry in PANELS:
            self.docks[entry.title] = w.add_panel(entry.title, self.panels[entry.key], entry.dock)
        w.add_banner(self.banner)
        w.controls.add_section(self.options)
        w.runChanged.connect(self._on_run_changed)
        w.scriptChanged.connect(self._on_script_changed)
        w.add_spec_hook(self.start_spec)
        w.ticked.connect(self.tick)
        w.tick_while(self.busy)
        browser = getattr(w, "run_browser", None)
        if browser is not None:  # a run picked there is the Fork panel's run too
            browser.view.selectionModel().selectionChanged.connect(self._on_browser_selection)
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
    def run(self) -> Run | None:
        """The run the window shows (live or just ended), or None."""
        return self.window.run

    @property
    def script_info(self) -> ScriptInfo | None:
        return self.window.script_info

    @property
    def store(self) -> Any:
        return self.window.store

    def active(self) -> bool:
        """Whether the window's run can take commands (it has not ended)."""
        return is_live(self.run)

    def run_config(self) -> RunConfig:
        """The settings Start would use now, with the lab's run options (raises ConfigError/LrvizError)."""
        return self.options.apply(self.window.config())

    def run_spec(self, config: RunConfig, **extra: Any) -> dict[str, Any]:
        """A spec for a run of the current script with ``config`` (as it is: no options added)."""
        return self.window.run_spec(config, **extra)

    def start_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The window's Start: ``spec`` (changed in place, and returned) with the lab's run options
        (guard policy, checkpoints, early stopping) and what :meth:`prepare_spec` adds."""
        spec["config"] = self.options.apply(RunConfig.from_dict(dict(spec.get("config") or {}))).to_dict()
        spec.update(self.prepare_spec(spec))
        return spec

    def prepare_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        """``spec`` with what the lab adds to every app run: per-layer statistics, and the slow-motion
        pace for a 2-D surface script (the guard options are in :meth:`run_config`)."""
        engine = dict(spec.get("engine") or {})
        engine.update(self.options.engine_options())
        config = dict(spec.get("config") or {})
        info = self.script_info
        surface = (info.surface(config.get("params")) if info is not None and same_script(spec.get("script"), info.path)
                   else None)
        config["pace"] = self.pace if surface is not None else None
        return {**spec, "config": config, "engine": engine}

    def start_run(self, spec: dict[str, Any], *, show: bool = True) -> ChildRun:
        """Start a run of the lab's own in a worker (``show``: the window shows it)."""
        return self.window.start_run(self.prepare_spec(spec), show=show)

    def wake(self) -> None:
        """Tick now and keep ticking while anything is live or a panel is busy."""
        self.window.wake()

    def set_pace(self, steps_per_s: float | None) -> None:
        """Slow motion (the surface view's pace): new surface runs, and the live one, at most this fast."""
        self.pace = steps_per_s
        run = self.run
        if is_live(run) and surface_for(self.script_info, run) is not None:
            run.set_pace(steps_per_s)  # acked at once; nothing to wait for

    def use_lr(self, lr: float) -> None:
        """Set the learning rate as if typed in the LR control (mid-run: the window sends it to the run)."""
        lr_control = self.window.controls.lr
        lr_control.set_value(lr)
        lr_control.set_button.click()

    def show_lr(self, lr: float) -> None:
        """Show the rate the run uses now in the LR control (after a roll-back), without sending it."""
        self.window.controls.lr.set_value(lr)

    def apply_schedule(self, spec: str) -> None:
        """Apply a schedule as if picked in the schedule editor (mid-run: the window sends it to the run)."""
        editor = self.window.controls.schedule
        editor.set_spec(spec)
        editor.apply_button.click()

    def overlay(self, run_ids: list[int]) -> None:
        self.window.overlay_runs(run_ids)

    def status(self, text: str) -> None:
        self.window.show_status(text)

    def refresh_runs(self) -> None:
        self.window.refresh_runs()
        self.panels["fork"].refresh()

    def load_script(self, path: str) -> None:
        self.window.load_script(path)

    def script_params(self) -> dict[str, Any]:
        """The script's knobs as set in the controls now (the script's own values while a field is wrong)."""
        try:
            return dict(self.window.config().params)
        except LrvizError:
            info = self.script_info
            return dict(info.params) if info is not None else {}

    def shown_run_id(self) -> int | None:
        """The stored run the window's plots show (its id), when it shows one."""
        return self.window.shown_run_id

    # ---- the window's timer and signals -----------------------------------------------------------------
    def tick(self, *_: Any) -> None:
        """One frame: every panel and the banner draw what is new."""
        run = self.run
        for name, panel in (("banner", self.banner), *self.panels.items()):
            try:
                panel.tick(run)
            except Exception:  # a panel's bug must not stop the others or the app
                log.exception("the lab's %s failed to update", name)
        active = is_live(run)
        if active != self._active:
            self._active = active
            self.options.set_running(active)
            for panel in self.panels.values():
                panel.run_changed(run)

    def busy(self) -> bool:
        """Whether the lab needs its ticks: the window's run is live, or a panel has work of its own
        running (a range test, a sweep)."""
        return is_live(self.run) or any(p.busy() for p in self.panels.values())

    def _on_run_changed(self, *_: Any) -> None:
        run = self.run
        self._active = is_live(run)
        self.options.set_running(self._active)
        for panel in self.panels.values():
            panel.run_changed(run)
        self.tick()

    def _on_script_changed(self, *_: Any) -> None:
        info = self.script_info
        for panel in self.panels.values():
            panel.script_changed(info)
        self.tick()

    def _on_browser_selection(self, *_: Any) -> None:
        ids = self.window.run_browser.selected_run_ids()
        if len(ids) == 1:
            self.panels["fork"].select_run(ids[0])

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the panels' own runs (a range test, a sweep), waiting at most ``timeout`` seconds each."""
        for panel in self.panels.values():
            panel.shutdown(timeout)
