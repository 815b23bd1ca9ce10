"""Starting the desktop app: ``lrviz`` and ``lrviz SCRIPT.py`` (and ``python -m lrviz``) call :func:`run_app`.

The app process never imports torch: the window is up before any training process has started,
and scripts load in a worker (see :mod:`lrviz.ui.script_loading`). With ``LRVIZ_FIRST_PAINT=1`` in
the environment the app prints ``lrviz: first paint at <unix time>`` to stderr when its window is
first exposed on screen (``bench/ui_startup.py`` measures the time from the process start to it).
"""

from __future__ import annotations

import gc
import os
import sys
import time

from PySide6.QtCore import QEvent, QObject, QTimer
from PySide6.QtWidgets import QApplication

from .app_settings import APP, ORG
from .main_window import MainWindow


def create_app(argv: list[str] | None = None) -> QApplication:
    """The QApplication (created when none exists), named for QSettings."""
    app = QApplication.instance()
    if app is None:
        app = QApplication(argv if argv is not None else sys.argv[:1] or ["lrviz"])
    app.setOrganizationName(ORG)
    app.setApplicationName(APP)
    app.setApplicationDisplayName("lrviz")
    app.setDesktopFileName("lrviz")
    return app  # type: ignore[return-value]


class _FirstPaint(QObject):
    """Prints the time of the window's first expose (for the start-up benchmark)."""

    def __init__(self, window: MainWindow):
        super().__init__(window)
        self.handle = window.windowHandle()
        self.handle.installEventFilter(self)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802
        if event.type() == QEvent.Type.Expose and self.handle.isExposed():
            print(f"lrviz: first paint at {time.time():.6f} after {time.process_time():.3f} s of CPU",
                  file=sys.stderr, flush=True)
            self.handle.removeEventFilter(self)
        return False


def run_app(script: str | None = None, store_path: str | None = None) -> int:
    """Open the main window, then (once it is on screen) ask a worker to load ``script`` — by default
    the last script opened, else the built-in default experiment — and attach to the runs the app
    left running when it closed last. Returns the application's exit status."""
    app = create_app()
    # Collect garbage on the GUI thread only: a collection that runs in another thread (a live
    # connection's reader) and frees a Qt object there can deadlock PySide.
    from pyqtgraph.util.garbage_collector import GarbageCollector

    gc_was_on = gc.isenabled()
    collector = GarbageCollector(interval=1.0, debug=False)  # disables automatic collection
    window = MainWindow(store_path)
    window.show()
    if os.environ.get("LRVIZ_FIRST_PAINT"):
        _FirstPaint(window)
    QTimer.singleShot(0, lambda: window.load_script(os.fspath(script) if script else None))
    QTimer.singleShot(0, window.runs.reattach)
    try:
        return app.exec()
    finally:  # the collector's timer keeps it alive (Qt holds the slot): stop it, restore gc as it was
        collector.timer.stop()
        if gc_was_on:
            gc.enable()
