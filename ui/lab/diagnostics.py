"""The diagnostics panel: is the run generalizing, and how big is each layer's step?

- Train vs validation loss with the generalization gap, and the verdict of
  :func:`lrviz.lab.generalization.generalization` (overfitting, underfitting, ok) in words.
- Per layer, the update-to-weight ratio ``log10(||dw|| / ||w||)`` with a reference line at -3
  (updates of 1/1000 of the weights per step): this is the *effective* step. With SGD it follows the
  learning rate times the gradient; with Adam it is about the learning rate whatever the gradient.
- Per layer, the gradient norm.
- ReduceLROnPlateau in one click (early stopping is in the run options under Controls).
"""

from __future__ import annotations

import html
import logging
import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import (
    QCheckBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QWidget,
)

from lrviz.errors import LrvizError
from lrviz.lab.generalization import UPDATE_RATIO_REFERENCE, GapReport, generalization

from .. import theme
from ..widgets import ValidatedLineEdit, parse_float_in, parse_int_at_least
from .common import RUN_COLOURS, LabPanel, fmt, lab_plot, note_label, same_script, scroll_column

if TYPE_CHECKING:
    from lrviz.live.run import Run
    from lrviz.scriptinfo import ScriptInfo

    from .panels import Lab

log = logging.getLogger(__name__)

VERDICT_COLOURS = {"overfitting": theme.VERMILLION, "underfitting": theme.ORANGE, "ok": theme.GREEN,
                   "not enough data": theme.GREY}
MAX_LAYERS = 12
LAYER_EVERY_TICKS = 6
#: Columns of the per-layer key (a table above the plots, never over them).
KEY_COLUMNS = 2


def short_names(names: list[str]) -> list[str]:
    """Parameter names without the dotted prefix they all share (``transformer.h.0.attn.weight`` and
    ``transformer.h.1.attn.weight`` become ``h.0.attn.weight`` and ``h.1.attn.weight``); a name
    keeps at least its last two parts."""
    parts = [n.split(".") for n in names]
    if len(parts) < 2:
        return list(names)
    common = 0
    while all(len(p) > common + 2 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [".".join(p[common:]) for p in parts]


def key_table(entries: list[str], columns: int, tail: str = "") -> str:
    """Rich text: ``entries`` in a table of ``columns`` columns (row by row), then ``tail`` on its own row."""
    rows = ["<tr>" + "".join(f"<td style='padding-right:10px'>{e}</td>" for e in entries[i:i + columns]) + "</tr>"
            for i in range(0, len(entries), columns)]
    if tail:
        rows.append(f"<tr><td colspan='{columns}'>{tail}</td></tr>")
    return "<table cellspacing='0' cellpadding='0'>" + "".join(rows) + "</table>" if rows else ""


class RunData:
    """Diagnostics data of the run the window shows (live or just ended), read through its Run."""

    def __init__(self, run: Run):
        from .surface import run_label

        self.run = run
        self.has_validation = True
        self.label = "previous: " + run_label(run.config or {})

    @property
    def validation(self) -> list[Any]:
        return self.run.validation

    def steps(self) -> tuple[np.ndarray, np.ndarray]:
        buf = self.run.buffer
        if buf is None or not len(buf):
            return np.zeros(0, np.int64), np.zeros(0)
        v = buf.view()
        return np.asarray(v["step"]), np.asarray(v["loss"])

    def layers(self) -> dict[str, Any] | None:
        return self.run.layers()


class StoredData:
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


def _parse_factor(text: str) -> float:
    v = parse_float_in(0.0, 1.0, "factor")(text)
    if not 0 < v < 1:
        from lrviz.errors import ConfigError

        raise ConfigError(f"factor must be between 0 and 1, not {text!r}")
    return v


class DiagnosticsPanel(LabPanel):
    """Generalization gap and verdict, per-layer update ratios and gradient norms of the shown run."""

    def __init__(self, lab: Lab, parent: QWidget | None = None):
        super().__init__(lab, parent)
        self.setObjectName("diagnosticsPanel")
        self.report: GapReport | None = None
        self._source: Any = None
        self._source_key: Any = None
        self._script: Any = None
        self._n_val = -1
        self._n_rows = -1
        self._layer_steps = -1
        self._ticks = 0
        self._layer_curves: dict[str, tuple[Any, Any]] = {}
        self._key: tuple[list[str], list[str], str] = ([], [], "")  # entries, their plain names, the last row
        self._previous: Any = None  # the mean update ratio of the run shown before
        self._previous_label = ""

        self.verdict = QLabel("")
        self.verdict.setObjectName("verdictLabel")
        self.verdict_text = note_label("Start a run with validation data to see how it generalizes.",
                                       theme.FOREGROUND)
        self.verdict_text.setObjectName("verdictText")

        self.gap_plot = lab_plot("step", "loss", min_height=120)
        self.gap_plot.setObjectName("gapPlot")
        p = self.gap_plot.getPlotItem()
        self.train_curve = p.plot(pen=theme.pen(theme.BLUE, 2.0), symbol="o", symbolSize=4,
                                  symbolBrush=theme.BLUE, symbolPen=None)
        self.val_curve = p.plot(pen=theme.pen(theme.VERMILLION, 2.0), symbol="o", symbolSize=4,
                                symbolBrush=theme.VERMILLION, symbolPen=None)
        self.gap_curve = p.plot(pen=theme.pen(theme.BLACK, 1.4, dashed=True))
        self.gap_key = note_label(f"<span style='color:{theme.BLUE}'>&#9644;</span> train (mean of the steps "
                                  f"before each validation) &nbsp; <span style='color:{theme.VERMILLION}'>&#9644;"
                                  "</span> validation &nbsp; <b>- -</b> gap = validation − train", theme.FOREGROUND)
        zero = pg.InfiniteLine(pos=0, angle=0, movable=False, pen=theme.pen(theme.GREY, 0.8, alpha=120))
        p.addItem(zero, ignoreBounds=True)

        self.ratio_plot = lab_plot("step", "log10 Δw / w", min_height=120)
        self.ratio_plot.setObjectName("ratioPlot")
        self.reference = pg.InfiniteLine(
            pos=UPDATE_RATIO_REFERENCE, angle=0, movable=False, pen=theme.pen(theme.BLACK, 1.5, dashed=True),
            label="−3 = 1e-3 per step", labelOpts={
                "position": 0.98, "color": theme.BLACK, "anchors": [(1, 1), (1, 1)],
                "fill": pg.mkBrush(255, 255, 255, 220)})
        self.reference.setZValue(10)
        self.reference.setToolTip("updates of about 1/1000 of the weights per step: the usual healthy size; "
                                  "far above, the rate is too high for that layer; far below, it barely learns")
        self.ratio_plot.getPlotItem().addItem(self.reference)
        self.grad_plot = lab_plot("step", "grad norm", log_y=True, min_height=100)
        self.grad_plot.setObjectName("layerGradPlot")
        self.layer_note = note_label("Per-layer statistics are recorded for runs started in the app "
                                     "(every 25 steps; see Controls).")
        self.layer_note.setObjectName("layerNote")
        self.layer_key = note_label("", theme.FOREGROUND, name="layerKey")
        self.show_biases = QCheckBox("biases")
        self.show_biases.setToolTip("also draw the bias vectors (their ratios are noisier)")
        layer_head = QHBoxLayout()
        layer_head.addWidget(QLabel("<b>per layer</b> (the effective step):"))
        layer_head.addStretch(1)
        layer_head.addWidget(self.show_biases)

        self.plateau_factor = ValidatedLineEdit(_parse_factor, "0.5", tooltip="multiply the rate by this")
        self.plateau_factor.setMaximumWidth(50)
        self.plateau_patience = ValidatedLineEdit(parse_int_at_least(0, "patience"), "3",
                                                  tooltip="validation passes without improvement first")
        self.plateau_patience.setMaximumWidth(40)
        self.plateau_button = QPushButton("Reduce LR on plateau")
        self.plateau_button.setObjectName("plateauButton")
        self.plateau_button.setToolTip("apply ReduceLROnPlateau: when the validation loss stops improving, "
                                       "multiply the rate by the factor (mid-run: from the next step)")
        self.plateau_button.setAutoDefault(False)
        plateau = QHBoxLayout()
        plateau.addWidget(self.plateau_button)
        plateau.addWidget(QLabel("×"))
        plateau.addWidget(self.plateau_factor)
        plateau.addWidget(QLabel("after"))
        plateau.addWidget(self.plateau_patience)
        plateau.addWidget(QLabel("flat validations"))
        plateau.addStretch(1)

        col = scroll_column(self)
        col.setContentsMargins(4, 4, 4, 4)
        col.setSpacing(4)
        col.addWidget(self.verdict)
        col.addWidget(self.verdict_text)
        col.addWidget(self.gap_key)
        col.addWidget(self.gap_plot, 3)
        col.addLayout(layer_head)
        col.addWidget(self.layer_key)
        col.addWidget(self.ratio_plot, 3)
        col.addWidget(self.grad_plot, 2)
        col.addWidget(self.layer_note)
        col.addLayout(plateau)
        self.plateau_button.clicked.connect(self._on_plateau)
        self.show_biases.toggled.connect(self._on_biases_toggled)
        self._set_verdict(None)

    # ---- the timer ----------------------------------------------------------------------------------
    def source_for(self, run: Run | None) -> Any:
        """What the panel shows: the window's run, else the stored run its plots show (read once)."""
        key: Any = None
        if run is not None:
            key = ("run", id(run))
        else:
            rid = self.lab.shown_run_id()
            if rid is not None and self.lab.store is not None:
                key = ("stored", rid)
        if key != self._source_key:
            self._source_key = key
            self._next = None
            if key is not None and key[0] == "run":
                self._next = RunData(run)  # type: ignore[arg-type]
            elif key is not None:
                try:
                    self._next = StoredData(self.lab.store, key[1])
                except LrvizError as exc:
                    log.warning("cannot read run #%s for diagnostics: %s", key[1], exc)
            return self._next
        return self._source

    def tick(self, run: Run | None = None) -> None:
        """Update from the run the window shows (or the stored run it shows)."""
        source = self.source_for(run)
        self._ticks += 1
        if source is not self._source:
            self._keep_previous(self._source)
            self._source = source
            self._n_val = self._n_rows = self._layer_steps = -1
            self._clear_layers()
        if source is None:
            return
        self._update_gap(source)
        if self._ticks % LAYER_EVERY_TICKS == 0 or self._layer_steps < 0:
            self._update_layers(source)

    def run_changed(self, run: Run | None) -> None:
        if run is not None and run.is_terminal:
            self.refresh()  # the run's last numbers

    def script_changed(self, info: ScriptInfo | None) -> None:
        path = info.path if info is not None else None
        if self._script is not None and path is not None and not same_script(path, self._script) \
                and self.lab.run is None:  # the window forgot the last run: its line belongs to the script before
            self._source_key = None
            self.forget()
        if path is not None:
            self._script = path

    def forget(self) -> None:
        """Show nothing, and no "previous" line: another script was opened."""
        if self._previous is not None:
            self.ratio_plot.getPlotItem().removeItem(self._previous)
        self._previous, self._previous_label = None, ""
        self._source, self.report = None, None
        self._n_val = self._n_rows = self._layer_steps = -1
        self._clear_layers()
        for curve in (self.train_curve, self.val_curve, self.gap_curve):
            curve.setData([], [])
        self._set_verdict(None, "Start a run with validation data to see how it generalizes.")

    def refresh(self) -> None:
        """Recompute everything now (e.g. at the end of a run)."""
        if self._source is not None:
            self._n_val = self._n_rows = self._layer_steps = -2
            self._update_gap(self._source)
            self._update_layers(self._source)

    def _update_gap(self, src: Any) -> None:
        val = src.validation
        nv = len(val)
        if nv == self._n_val:
            return
        self._n_val = nv
        steps, loss = src.steps()
        pts = list(val[:nv])
        vs = np.array([p.step for p in pts], dtype=np.int64)
        vl = np.array([p.loss for p in pts], dtype=np.float64)
        if not nv:
            self._set_verdict(None, "This run has no validation points yet" + (
                "" if src.has_validation else " (the script's build_data() returns no validation data)") + ".")
            return
        try:
            rep = generalization(steps, loss, vs, vl)
        except LrvizError as exc:
            self._set_verdict(None, str(exc))
            return
        self.report = rep
        self.train_curve.setData(rep.steps, rep.train)
        self.val_curve.setData(rep.steps, rep.val)
        self.gap_curve.setData(rep.steps, rep.gap)
        self._set_verdict(rep)

    def _set_verdict(self, rep: GapReport | None, text: str | None = None) -> None:
        if rep is None:
            self.verdict.setText("<b>generalization:</b> —")
            if text:
                self.verdict_text.setText(text)
            return
        colour = VERDICT_COLOURS.get(rep.verdict, theme.GREY)
        gap = rep.details.get("gap")
        gap_text = f" · gap {fmt(gap, 3)}" if gap is not None and math.isfinite(gap) else ""
        self.verdict.setText(f"<b>generalization:</b> <b style='color:{colour}; font-size: 13pt'>"
                             f"{rep.verdict}</b>{gap_text}")
        self.verdict_text.setText(rep.explanation[:1].upper() + rep.explanation[1:] + ".")

    def _keep_previous(self, src: Any) -> None:
        """Keep the mean update ratio of the run shown before, as a grey dashed line to compare with
        (e.g. Adam's effective step next to SGD's)."""
        data = src.layers() if src is not None else None
        if data is None or len(data["step"]) < 2:
            return
        names = list(data["names"])
        cols = [k for k, n in enumerate(names) if not n.endswith("bias")] or list(range(len(names)))
        ratio = np.asarray(data["update_ratio"], dtype=np.float64)[:, cols]
        ratio[~np.isfinite(ratio)] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # steps where every layer is NaN: a gap
            mean = np.nanmean(ratio, axis=1)
        p = self.ratio_plot.getPlotItem()
        if self._previous is not None:
            p.removeItem(self._previous)
        self._previous = pg.PlotDataItem(np.asarray(data["step"], dtype=np.float64), mean, connect="finite",
                                         pen=theme.pen(theme.GREY, 2.0, alpha=200, dashed=True))
        self._previous.setZValue(-1)
        p.addItem(self._previous, ignoreBounds=True)  # the view follows the run shown, not this one
        self._previous_label = getattr(src, "label", "") or "the previous run"

    def _clear_layers(self) -> None:
        for ratio, grad in self._layer_curves.values():
            self.ratio_plot.getPlotItem().removeItem(ratio)
            self.grad_plot.getPlotItem().removeItem(grad)
        self._layer_curves = {}
        self._key = ([], [], "")
        self.layer_key.setText("")

    def _on_biases_toggled(self, _on: bool) -> None:
        self._clear_layers()
        self._layer_steps = -1
        if self._source is not None:
            self._update_layers(self._source)

    def _update_layers(self, src: Any) -> None:
        data = src.layers()
        if data is None:
            self.layer_note.setText("Per-layer statistics are recorded for runs started in the app "
                                    "(every 25 steps; see Controls).")
            self.layer_note.setVisible(True)
            return
        steps = data["step"]
        if len(steps) == self._layer_steps:
            return
        self._layer_steps = len(steps)
        names = list(data["names"])
        shown = [k for k, n in enumerate(names) if self.show_biases.isChecked() or not n.endswith("bias")]
        if not shown:
            shown = list(range(len(names)))
        left_out = len(shown) - MAX_LAYERS
        shown = shown[:MAX_LAYERS]
        self.layer_note.setVisible(left_out > 0 or not len(steps))
        if left_out > 0:
            self.layer_note.setText(f"Showing {MAX_LAYERS} of {MAX_LAYERS + left_out} parameters.")
        elif not len(steps):
            self.layer_note.setText("Waiting for the first per-layer statistics…")
        x = np.asarray(steps, dtype=np.float64)
        ratio = np.asarray(data["update_ratio"], dtype=np.float64)
        grad = np.asarray(data["grad_norm"], dtype=np.float64)
        short = short_names([names[k] for k in shown])
        key = []
        for j, k in enumerate(shown):
            name = names[k]
            colour = RUN_COLOURS[j % len(RUN_COLOURS)]
            dashed = j >= len(RUN_COLOURS)
            if name not in self._layer_curves:
                r = self.ratio_plot.getPlotItem().plot(pen=theme.pen(colour, 1.6, dashed=dashed))
                g = self.grad_plot.getPlotItem().plot(pen=theme.pen(colour, 1.4, dashed=dashed))
                self._layer_curves[name] = (r, g)
            key.append(f"<span style='color:{colour}'>{'- -' if dashed else '&#9644;'}</span>&nbsp;"
                       f"{html.escape(short[j])}")
            r, g = self._layer_curves[name]
            if len(x):
                yr = ratio[:, k].copy()
                yr[~np.isfinite(yr)] = np.nan
                yg = grad[:, k].copy()
                yg[~(yg > 0)] = np.nan
                r.setData(x, yr, connect="finite")
                g.setData(x, yg, connect="finite")
        self._key = (key, short, f"<span style='color:{theme.GREY}'><b>- -</b>&nbsp;{self._previous_label} (mean)"
                     "</span>" if self._previous is not None else "")
        self._show_key()
        self.layer_key.setToolTip("\n".join(names[k] for k in shown))

    def _show_key(self) -> None:
        """The per-layer key in as many columns (up to KEY_COLUMNS) as its longest name allows."""
        entries, plain, tail = self._key
        fm = self.layer_key.fontMetrics()
        widest = max((fm.horizontalAdvance(f"-- {t}") for t in plain), default=0) + 12
        room = self.width() - 40  # the panel's margins and a scroll bar
        columns = max(1, min(KEY_COLUMNS, room // max(widest, 1)))
        self.layer_key.setText(key_table(entries, columns, tail))

    def resizeEvent(self, event: Any) -> None:  # noqa: N802
        super().resizeEvent(event)
        if self._key[0]:
            self._show_key()

    # ---- ReduceLROnPlateau -------------------------------------------------------------------------
    def plateau_spec(self) -> str:
        return (f"ReduceLROnPlateau:factor={self.plateau_factor.value():g},"
                f"patience={self.plateau_patience.value()}")

    def _on_plateau(self) -> None:
        try:
            spec = self.plateau_spec()
        except LrvizError as exc:
            self.lab.status(str(exc))
            return
        self.lab.apply_schedule(spec)
