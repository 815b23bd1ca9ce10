"""File > Export plot / Export data: what the plots show, at full fidelity, from the run or the store."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtWidgets import QFileDialog, QMessageBox

from lrviz.errors import LrvizError

if TYPE_CHECKING:
    from .main_window import MainWindow

PLOT_FORMATS = [("PNG image (*.png)", "png"), ("SVG image (*.svg)", "svg"), ("PDF document (*.pdf)", "pdf")]
DATA_FORMATS = [("CSV, every step (*.csv)", "csv"), ("JSON, run and events (*.json)", "json")]


def detail_of(err: BaseException) -> str:
    """The traceback behind an error, for a message's "Show Details…"."""
    cause = err.__cause__ or err.__context__
    if cause is not None:
        return "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
    return getattr(err, "detail", "") or str(err)


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


class ExportActions:
    """Exports of the window's plots and of the shown run's records."""

    def __init__(self, window: MainWindow):
        self.window = window

    def primary_records(self) -> dict[str, Any] | None:
        """Full-fidelity records of the primary run: steps, events, validation, run info, config."""
        w = self.window
        item = w.plots.primary
        if item is None:
            return None
        tr = item.trace
        run = w.run
        from lrviz.export import run_record

        if tr.live and run is not None:
            record: dict[str, Any] = {"id": run.run_id, "name": run.name or None, "script_path": run.script_path,
                                      "status": str(run.state), "device": run.device}
            if run.run_id is not None and w.store is not None and w.run_in_store(run):
                try:
                    record = run_record(w.store.get_run(run.run_id))
                    record["status"] = str(run.state)
                except LrvizError:
                    pass
            return {"steps": run.buffer.view() if run.buffer is not None else {}, "events": list(run.events),
                    "validation": list(run.validation), "run": record, "config": dict(run.config),
                    "summary": run.summary(), "label": record.get("name") or run.name or Path(run.script_path).stem}
        if tr.run_id is not None and w.store is not None:
            info = w.store.get_run(tr.run_id)
            return {"steps": w.store.load_steps(info.id), "events": w.store.load_events(info.id),
                    "validation": w.store.load_validation(info.id), "run": run_record(info),
                    "config": info.config, "summary": info.summary, "label": info.name}
        return None

    def _target(self, caption: str, filters: list[tuple[str, str]], stem: str) -> tuple[str, str] | None:
        prefs = self.window.prefs
        start = str(Path(prefs.export_dir()) / stem)
        path, chosen = QFileDialog.getSaveFileName(self.window, caption, start, ";;".join(f for f, _ in filters))
        if not path:
            return None
        path, fmt = export_path(path, chosen, filters)
        prefs.set("exportDir", str(Path(path).parent))
        return path, fmt

    def on_export_plot(self) -> None:
        rec = self.primary_records()
        if rec is None and not self.window.plots.overlays:
            return
        stem = str(rec["label"]) if rec is not None else "comparison"
        target = self._target("Export plot", PLOT_FORMATS, f"{stem}.png")
        if target is not None:
            self.export_plot(*target)

    def plot_description(self) -> tuple[list[Any], Any]:
        """What the plots show now, as the renderer takes it: the runs (every step, from the run or
        the store, in their screen colours) and the :class:`lrviz.export.FigureSpec` (panels,
        smoothing, log axes, the steps in view, a title)."""
        from lrviz.export import describe_run

        from . import render

        w = self.window
        rec = self.primary_records()
        runs = []
        if rec is not None:
            runs.append(render.RunData(label=str(rec["label"]), steps=rec["steps"], events=rec["events"],
                                       validation=rec["validation"]))
        for item in w.plots.overlays:
            rid = item.trace.run_id
            try:  # drawn as on screen: in its colour, its events not marked
                runs.append(render.RunData.from_store(w.store, rid, label=item.trace.label, colour=item.colour,
                                                      marked=False))
            except LrvizError as exc:
                w.show_status(f"run #{rid} left out: {exc}")
        if len(runs) > 1 or rec is None:
            title = "comparison of " + ", ".join(r.label.split(" (")[0] for r in runs)
        else:
            title = describe_run(rec["run"], rec["config"])
        return runs, w.plots.figure_spec(title)

    def export_plot(self, path: str, fmt: str) -> bool:
        """Render what the plots show (the primary run and the overlays, every step; the same panels,
        smoothing, log axes, markers and steps in view) to ``path`` as png, svg or pdf."""
        from . import render

        runs, figure = self.plot_description()
        if not runs:
            return False
        try:
            render.render_run(runs, path, fmt, figure=figure)
        except (LrvizError, OSError) as exc:
            self.window.show_message(QMessageBox.Icon.Warning, "Export failed", str(exc), detail_of(exc))
            return False
        self.window.show_status(f"saved {path}")
        return True

    def on_export_data(self) -> None:
        rec = self.primary_records()
        if rec is None:
            return
        target = self._target("Export data", DATA_FORMATS, f"{rec['label']}.csv")
        if target is not None:
            self.export_data(*target)

    def export_data(self, path: str, fmt: str) -> bool:
        """Write the shown run's every step as CSV (``fmt='csv'``) or the run as JSON (``'json'``)."""
        rec = self.primary_records()
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
            self.window.show_message(QMessageBox.Icon.Warning, "Export failed", str(exc), detail_of(exc))
            return False
        self.window.show_status(f"saved {path}")
        return True
