"""A stand-in for the main window that offers the lab exactly its seam (``lrviz.ui.lab.panels.LabWindow``),
so the lab's panels can be tested on in-process runs (:class:`lrviz.live.run.LocalRun`): fast, and
independent of how the window itself trains. ``start_run(spec)`` builds the spec's engine here and
trains it in a thread, as a worker process would (``lrviz.live.serve.build_engine``).

The end-to-end tests use the real window and real child processes instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lrviz.ui.lab.panels import Lab
from lrviz.ui.widgets import LrControl
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import QDockWidget, QMainWindow, QPushButton, QVBoxLayout, QWidget

from lrviz.config import RunConfig
from lrviz.experiment import load_experiment
from lrviz.live.run import LocalRun
from lrviz.live.serve import build_engine
from lrviz.live.worker import describe_experiment
from lrviz.scriptinfo import ScriptInfo
from lrviz.store.runs import RunStore


class _Schedule(QWidget):
    def __init__(self, host: LabHost):
        super().__init__()
        self.spec = ""
        self.apply_button = QPushButton("Apply schedule")
        self.apply_button.clicked.connect(lambda: host.schedule_applied(self.spec))

    def set_spec(self, spec: str) -> None:
        self.spec = spec


class _Controls(QWidget):
    def __init__(self, host: LabHost):
        super().__init__()
        self.lr = LrControl(0.01)
        self.schedule = _Schedule(host)
        self.sections: list[QWidget] = []
        col = QVBoxLayout(self)
        col.addWidget(self.lr)
        self.lr.lrCommitted.connect(host.lr_committed)

    def add_section(self, widget: QWidget) -> None:
        self.sections.append(widget)
        self.layout().addWidget(widget)


class LabHost(QMainWindow):
    """The window's seam, and nothing else; runs are LocalRuns of engines trained in threads."""

    runChanged = Signal(object)
    scriptChanged = Signal(object)
    ticked = Signal()

    def __init__(self, store_path: str | Path | None):
        super().__init__()
        self.store = RunStore(store_path) if store_path is not None else None
        self.store_path = str(self.store.path) if self.store is not None else None
        self.controls = _Controls(self)
        self.banners: list[QWidget] = []
        central = QWidget()
        self._column = QVBoxLayout(central)
        self._column.addWidget(self.controls)
        self.setCentralWidget(central)
        self.run: Any = None
        self.script_info: ScriptInfo | None = None
        self.shown_run_id: int | None = None
        self.overrides: dict[str, Any] = {}
        self.started: list[LocalRun] = []
        self.statuses: list[str] = []
        self.overlays: list[list[int]] = []
        self.applied: list[str] = []
        self.sent: list[Any] = []  # what the LR control and the schedule editor sent to the run
        self._hooks: list[Any] = []
        self._stores: list[RunStore] = []
        self._busy: list[Any] = []
        self._timer = QTimer(self)
        self._timer.setInterval(33)
        self._timer.timeout.connect(self._tick)
        self.lab = Lab(self)
        self.lab.install()

    # ---- the seam ----------------------------------------------------------------------------------
    def load(self, script: str | Path) -> ScriptInfo:
        """Load a script as the window would (its ScriptInfo, as a worker describes it)."""
        self.script_info = ScriptInfo.from_dict(describe_experiment(load_experiment(script)))
        self.scriptChanged.emit(self.script_info)
        return self.script_info

    def config(self) -> RunConfig:
        if self.script_info is None:
            from lrviz.errors import ConfigError

            raise ConfigError("load a script first")
        return RunConfig(**self.script_info.defaults).merged(self.overrides).validated()

    def run_spec(self, config: RunConfig | None = None, **extra: Any) -> dict[str, Any]:
        cfg = (config or self.config()).to_dict()
        return {"script": str(self.script_info.path), "config": cfg, "store": self.store_path, **extra}

    def start(self, **spec_extra: Any) -> LocalRun:
        """The window's Start: the controls' settings through every spec hook, shown."""
        spec = self.run_spec(**spec_extra)
        for hook in self._hooks:
            hook(spec)
        return self.start_run(spec)

    def start_run(self, spec: dict[str, Any], *, show: bool = True) -> LocalRun:
        engine, store = build_engine(spec)  # the run's own store connection, as in a worker
        if store is not None:
            self._stores.append(store)
        run = LocalRun(engine)
        engine.start()
        self.started.append(run)
        if show:
            self.show_run(run)
        self.wake()
        return run

    def show_run(self, run: Any) -> None:
        self.run = run
        self.runChanged.emit(run)

    def add_spec_hook(self, fn: Any) -> None:
        self._hooks.append(fn)

    def tick_while(self, busy: Any) -> None:
        self._busy.append(busy)

    def wake(self) -> None:
        if not self._timer.isActive():
            self._timer.start()

    def _tick(self) -> None:
        self.ticked.emit()
        live = self.run is not None and not self.run.done.is_set()
        if not live and not any(b() for b in self._busy):
            self._timer.stop()

    def add_panel(self, title: str, widget: QWidget, name: str) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(name)
        dock.setWidget(widget)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
        return dock

    def add_banner(self, widget: QWidget) -> None:
        self.banners.append(widget)
        self._column.insertWidget(0, widget)

    def show_status(self, text: str, ms: int = 8000) -> None:
        self.statuses.append(text)

    def refresh_runs(self) -> None:
        pass

    def overlay_runs(self, run_ids: list[int]) -> None:
        self.overlays.append(list(run_ids))

    def load_script(self, path: str) -> None:
        self.load(path)

    # ---- what the window does with its controls -------------------------------------------------------
    def lr_committed(self, lr: float) -> None:
        if self.run is not None and not self.run.done.is_set():
            self.sent.append(self.run.set_lr(lr))
        else:
            self.overrides["lr"] = lr

    def schedule_applied(self, spec: str) -> None:
        self.applied.append(spec)
        if self.run is not None and not self.run.done.is_set():
            self.sent.append(self.run.set_schedule(spec or None))
        else:
            self.overrides["schedule"] = spec or None

    def stop_all(self, timeout: float = 30.0) -> None:
        """Stop every run started here and wait for them (the test's end)."""
        self.lab.shutdown(timeout)
        for run in self.started:
            run.engine.stop()
        for run in self.started:
            run.engine.join(timeout)
        self._timer.stop()
        for store in [self.store, *self._stores]:
            if store is not None:
                store.close()


@pytest.fixture(name="host")
def host_fixture(qtbot, tmp_path):
    """A shown LabHost on a store in tmp_path; its runs are stopped at the end."""
    h = LabHost(tmp_path / "store")
    qtbot.addWidget(h)
    h.resize(1000, 700)
    h.show()
    qtbot.waitExposed(h)
    yield h
    h.stop_all()
