"""Starting the desktop app: ``lrviz`` and ``lrviz SCRIPT.py`` (and ``python -m lrviz``) call :func:`run_app`."""

from __future__ import annotations

import os
import sys

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication

from . import _compat  # noqa: F401  (must run first: PySide6 6.12 signal refcount defect)
from .main_window import APP, ORG, MainWindow


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


def run_app(script: str | None = None, store_path: str | None = None) -> int:
    """Open the main window, then (once it is on screen) load ``script`` — by default the last script
    opened, else the built-in default experiment. Returns the application's exit status."""
    app = create_app()
    # Collect garbage on the GUI thread only: a collection that runs in the training thread and
    # frees a Qt object there can deadlock PySide (GIL held by the GUI thread, Qt mutex by the other).
    from pyqtgraph.util.garbage_collector import GarbageCollector

    collector = GarbageCollector(interval=1.0, debug=False)  # noqa: F841  (kept alive by this frame)
    window = MainWindow(store_path)
    window.show()
    # Loading imports torch and the script: do it after the first paint, in the background.
    QTimer.singleShot(0, lambda: window.load_script(os.fspath(script) if script else None))
    return app.exec()
