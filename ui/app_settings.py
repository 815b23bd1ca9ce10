"""What the app remembers between sessions (QSettings "lrviz"/"lrviz"): the window's layout, the last
script and the recent ones, the plot choices, the export folder, and the runs it left running."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QByteArray, QSettings
from PySide6.QtGui import QGuiApplication

if TYPE_CHECKING:
    from .main_window import MainWindow

ORG = "lrviz"
APP = "lrviz"
MAX_RECENT = 10
#: The version of the window's dock layout saved with its state: raise it when docks are added, removed
#: or regrouped, so a state saved by an older window is not laid over the new docks (an old state once
#: stacked the new lab docks into a window 1,315 px tall on an 800-px screen).
LAYOUT_VERSION = 2


def settings() -> QSettings:
    """The app's persistent settings (QSettings, organisation and application "lrviz")."""
    return QSettings(ORG, APP)


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    return [str(v) for v in (value or []) if v]


class AppSettings:
    """Typed access to the app's settings."""

    def __init__(self, qsettings: QSettings | None = None):
        self.q = qsettings or settings()

    # ---- scripts -----------------------------------------------------------------------------------
    def recent_files(self) -> list[str]:
        return _as_list(self.q.value("recentFiles", []))

    def remember_script(self, path: str) -> None:
        """``path`` becomes the last script and the first of the recent ones."""
        recent = [p for p in self.recent_files() if p != path]
        recent.insert(0, path)
        self.q.setValue("recentFiles", recent[:MAX_RECENT])
        self.q.setValue("lastScript", path)

    def clear_recent(self) -> None:
        self.q.setValue("recentFiles", [])

    def last_script(self) -> str | None:
        """The script opened last, when it still exists."""
        last = self.q.value("lastScript")
        return str(last) if last and Path(str(last)).is_file() else None

    # ---- the window -----------------------------------------------------------------------------
    def restore_window(self, w: MainWindow) -> None:
        """The window's size, docks, loss smoothing and log axes as they were left."""
        geo = self.bytes("geometry")
        if geo is not None:
            w.restoreGeometry(geo)
        else:
            w.resize(1280, 800)
        state = self.bytes("windowState")
        if state is not None:
            default = w.saveState(LAYOUT_VERSION)
            least = w.minimumSizeHint()
            if w.restoreState(state, LAYOUT_VERSION) and not _fits(w, least):
                w.restoreState(default, LAYOUT_VERSION)  # a layout that cannot fit the screen: the default one
        _fit_to_screen(w)
        w.smoothing.setValue(min(max(self.int_value("smoothing", 60), 0), 99))
        w.plots.set_smoothing(w.smoothing.value() / 100)
        for plot, box in w.log_checks.items():
            on = self.bool_value(f"log_{plot}")
            if on is not None:
                box.setChecked(on)

    def save_window(self, w: MainWindow) -> None:
        self.set("geometry", w.saveGeometry())
        self.set("windowState", w.saveState(LAYOUT_VERSION))
        self.set("smoothing", w.smoothing.value())
        for plot, box in w.log_checks.items():
            self.set(f"log_{plot}", box.isChecked())
        self.sync()

    def bytes(self, key: str) -> QByteArray | None:
        v = self.q.value(key)
        return v if isinstance(v, (QByteArray, bytes)) and v else None

    def int_value(self, key: str, default: int) -> int:
        try:
            return int(self.q.value(key, default))
        except (TypeError, ValueError):
            return default

    def bool_value(self, key: str) -> bool | None:
        v = self.q.value(key)
        return None if v is None else str(v).lower() in ("true", "1")

    def export_dir(self) -> str:
        return str(self.q.value("exportDir", str(Path.home())))

    # ---- runs left running ----------------------------------------------------------------------
    def left_running(self) -> list[tuple[str, int]]:
        """Runs this app started and left running when it closed: (store path, run id)."""
        out = []
        for item in _as_list(self.q.value("leftRunning", [])):
            store, _, rid = item.rpartition("|")
            if store and rid.isdigit():
                out.append((store, int(rid)))
        return out

    def set_left_running(self, runs: list[tuple[str, int]]) -> None:
        self.q.setValue("leftRunning", [f"{store}|{rid}" for store, rid in runs])

    def set(self, key: str, value: Any) -> None:
        self.q.setValue(key, value)

    def sync(self) -> None:
        self.q.sync()


def _screen_size(w: MainWindow) -> Any:
    screen = w.screen() or QGuiApplication.primaryScreen()
    return screen.availableGeometry().size() if screen is not None else None


def _fits(w: MainWindow, default_least: Any) -> bool:
    """Whether the restored layout's smallest size fits the screen (or is no larger than the default's)."""
    avail = _screen_size(w)
    least = w.minimumSizeHint()
    if avail is None:
        return True
    return (least.width() <= max(avail.width(), default_least.width())
            and least.height() <= max(avail.height(), default_least.height()))


def _fit_to_screen(w: MainWindow) -> None:
    """A window no larger than the screen's free area (a size saved on a larger screen, or a layout that grew)."""
    avail = _screen_size(w)
    if avail is None:
        return
    least = w.minimumSizeHint()
    width = max(min(w.width(), avail.width()), least.width())
    height = max(min(w.height(), avail.height()), least.height())
    if (width, height) != (w.width(), w.height()):
        w.resize(width, height)
