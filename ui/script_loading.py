"""Loading experiment scripts: Open, drag and drop, recent files, Reload, and the default experiment.

The app never imports a script (nor torch): a worker of the app's pool loads it and describes it
(:class:`lrviz.scriptinfo.ScriptInfo`). The window is up at once and says "loading…" until the
answer comes; a script that fails to load gets one message naming the file and the line (the
traceback behind "Show Details…") and the script loaded before stays loaded.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QFileDialog, QMenu, QMessageBox

from lrviz.errors import LrvizError, ScriptError
from lrviz.examples import default_experiment_path

from . import theme
from .futures import GuiFutures

if TYPE_CHECKING:
    from lrviz.scriptinfo import ScriptInfo

    from .main_window import MainWindow

log = logging.getLogger(__name__)


def dropped_script(event: Any) -> str | None:
    """The first local ``.py`` file of a drag-and-drop event, or None."""
    mime = event.mimeData()
    if not mime.hasUrls():
        return None
    for url in mime.urls():
        if url.isLocalFile() and url.toLocalFile().endswith(".py"):
            return url.toLocalFile()
    return None


def notes_of(info: ScriptInfo) -> str:
    """The Script panel's text: the script's docstring ("what to try"), knobs and defaults."""
    try:
        from .lab.notes import notes_html

        return notes_html(info)
    except Exception:  # the lab's renderer is another room: a plain version rather than nothing
        log.debug("the lab's notes renderer failed; showing the plain docstring", exc_info=True)
    doc = info.doc or "This script has no docstring. Add one at the top of the file to note what to try."
    paras = "".join(f"<p>{escape(p).replace(chr(10), ' ')}</p>" for p in doc.split("\n\n"))
    return f"<h3>{escape(info.path.name)}</h3><p style='color:{theme.GREY}'>{escape(str(info.path.parent))}</p>{paras}"


class ScriptLoader(QObject):
    """Asks the worker pool about scripts and applies the answer to the window.

    Signals: ``loaded(ScriptInfo)`` after a script loaded, ``failed(str)`` (the script asked) after
    one did not.
    """

    loaded = Signal(object)
    failed = Signal(str)

    def __init__(self, window: MainWindow):
        super().__init__(window)
        self.window = window
        self.futures = GuiFutures(self)
        self.pending: str | None = None
        self._devices_asked = False
        self.recent_menu = QMenu("Open &recent", window)
        self.recent_menu.setObjectName("recentMenu")
        self.rebuild_recent_menu()

    # ---- asking ----------------------------------------------------------------------------------
    def load(self, path: str | Path | None = None) -> bool:
        """Ask for a script (None: the last one opened, else the default example); False when another
        is still loading. The answer arrives later (``loaded`` or ``failed``)."""
        w = self.window
        if self.pending is not None:
            w.show_status("still loading the previous script…")
            return False
        ref = str(path) if path is not None else (w.prefs.last_script() or str(default_experiment_path()))
        self.pending = ref
        w.status.busy(True, f"Loading {Path(ref).name}…")
        pool = w.pool
        self.futures.when_done(pool.inspect(ref), lambda f: self._on_answer(ref, f))
        if not self._devices_asked:
            self._devices_asked = True
            self.futures.when_done(pool.spare().ready, self._on_worker_ready)
        return True

    def _on_worker_ready(self, fut: Future) -> None:
        if fut.exception() is None:
            devices = list(fut.result().get("devices") or [])
            if devices:
                self.window.controls.set_devices(devices)

    def _on_answer(self, ref: str, fut: Future) -> None:
        w = self.window
        self.pending = None
        if w.closed:
            return
        w.status.busy(False, state_after=w.shown_state())
        exc = fut.exception()
        if exc is not None:
            self._on_failed(ref, exc)
            return
        self.apply(fut.result())

    def _on_failed(self, ref: str, err: BaseException) -> None:
        w = self.window
        before = w.script_info
        kept = f"\n\n{before.path.name} stays loaded." if before is not None else ""
        text = str(err) if isinstance(err, LrvizError) else f"{type(err).__name__}: {err}"
        if not isinstance(err, ScriptError) and getattr(err, "path", None) is None and ref not in text:
            text = f"{ref}: {text}"
        w.show_message(QMessageBox.Icon.Critical, "Cannot load the script", f"{text}{kept}",
                       getattr(err, "detail", "") or "")
        w.show_status(f"could not load {ref}")
        if before is None:
            w.plots.set_hint("No script loaded: File > Open script…")
        self.failed.emit(ref)

    def apply(self, info: ScriptInfo) -> None:
        """Show ``info`` as the loaded script: controls from its DEFAULTS, notes, title, recent files."""
        w = self.window
        w.controls.set_script(info)
        w.notes.setHtml(notes_of(info))
        w.script_label.setText(info.path.name)
        w.script_label.setToolTip(str(info.path))
        w.setWindowTitle(f"{info.name} — lrviz")
        w.prefs.remember_script(str(info.path))
        self.rebuild_recent_menu()
        w.show_status(f"loaded {info.path}")
        self.loaded.emit(info)

    # ---- what a person does ------------------------------------------------------------------------
    def open_dialog(self) -> None:
        info = self.window.script_info
        start = str(info.path.parent) if info is not None else str(Path.home())
        path, _ = QFileDialog.getOpenFileName(self.window, "Open experiment script", start, "Python scripts (*.py)")
        if path:
            self.load(path)

    def reload(self) -> None:
        info = self.window.script_info
        if info is not None:
            self.load(str(info.path))

    def rebuild_recent_menu(self) -> None:
        menu = self.recent_menu
        menu.clear()
        recent = self.window.prefs.recent_files()
        for path in recent:
            a = menu.addAction(Path(path).name)
            a.setToolTip(path)
            a.setStatusTip(path)
            a.triggered.connect(lambda _=False, p=path: self.load(p))
        if recent:
            menu.addSeparator()
            menu.addAction("Clear list", self._on_clear_recent)
        else:
            a = menu.addAction("(none yet)")
            a.setEnabled(False)

    def _on_clear_recent(self) -> None:
        self.window.prefs.clear_recent()
        self.rebuild_recent_menu()
