"""What the app remembers between sessions (QSettings "lrviz"/"lrviz"): the window's layout, the last
script and the recent ones, the plot choices, the export folder, and the runs it left running."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QByteArray, QSettings

if TYPE_CHECKING:
    from .main_window import MainWindow

ORG = "lrviz"
APP = "lrviz"
MAX_RECENT = 10


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
            w.restoreState(state)
        w.smoothing.setValue(min(max(self.int_value("smoothing", 60), 0), 99))
        w.plots.set_smoothing(w.smoothing.value() / 100)
        for plot, box in w.log_checks.items():
            on = self.bool_value(f"log_{plot}")
            if on is not None:
                box.setChecked(on)

    def save_window(self, w: MainWindow) -> None:
        self.set("geometry", w.saveGeometry())
        self.set("windowState", w.saveState())
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
