"""The 2-D surface view: a loss surface as a contour map, and the optimizer's path across it, live.

For scripts that define ``SURFACE`` (or ``SURFACES`` and a ``surface`` knob) and ``probe(model)``:
the worker that loaded the script sampled the function on a grid over its ``xlim`` x ``ylim``
(:attr:`lrviz.scriptinfo.ScriptInfo.surfaces`), drawn here as a shaded map with contour lines
(log-spaced levels when ``log_levels``), its minima marked; the run records ``probe`` every step,
and the path of the point is drawn from ``run.probe_steps``/``run.probe_values`` as it trains, the
current point highlighted. Paths of earlier runs stay, faintly, so SGD, momentum and Adam can be
compared. These runs take thousands of steps a second, so the panel offers slow motion
(``run.set_pace``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from lrviz.examples import example_paths

from .. import theme
from .common import LabPanel, add_legend, fmt, lab_plot, note_label, same_script, surface_for

if TYPE_CHECKING:
    from lrviz.live.run import Run

    from .panels import Lab

LEVELS = 14
MAX_KEPT = 6
#: Pace choices: label and steps per second (None: full speed).
PACES = (("full speed", None), ("1000 steps/s", 1000.0), ("200 steps/s", 200.0), ("50 steps/s", 50.0),
         ("10 steps/s", 10.0))
#: Colours of kept paths (the live one is vermillion).
KEPT_COLOURS = (theme.BLACK, theme.ORANGE, theme.PURPLE, theme.GREEN, theme.BLUE, theme.GREY)
LIVE_COLOUR = theme.VERMILLION
MAX_POINTS = 20000


@dataclass
class KeptPath:
    """The path of an earlier run, drawn faintly."""

    label: str
    x: np.ndarray
    y: np.ndarray
    colour: str
    curve: Any = None
    end: Any = None


def surface_grid(surface: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``xs`` (n,), ``ys`` (m,) and ``z`` (m, n) with ``z[j, i] = fn(xs[i], ys[j])``, as the worker
    sampled them (NaN where the function was not finite)."""
    xs = np.asarray(surface["xs"], dtype=np.float64)
    ys = np.asarray(surface["ys"], dtype=np.float64)
    z = np.array([[math.nan if v is None else v for v in row] for row in surface["z"]], dtype=np.float64)
    return xs, ys, z


def contour_levels(z: np.ndarray, log_levels: bool, count: int = LEVELS) -> np.ndarray:
    """Contour levels over ``z``: log-spaced above the minimum when ``log_levels``, else even."""
    zmin, zmax = float(np.nanmin(z)), float(np.nanmax(z))
    if not (math.isfinite(zmin) and math.isfinite(zmax)) or zmax <= zmin:
        return np.array([zmin])
    span = zmax - zmin
    if log_levels:
        return zmin + np.logspace(math.log10(span * 1e-4), math.log10(span * 0.9), count)
    return np.linspace(zmin, zmax, count + 2)[1:-1]


def run_label(cfg: Any) -> str:
    """A short name of a run's optimizer settings (its config, a dict or a RunConfig):
    ``sgd lr 0.001``, ``sgd m0.9 lr 1e-3``, ``adam lr 0.05``."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    name = str(get("optimizer", "?"))
    mom = float(get("momentum", 0.0) or 0.0)
    if mom and name == "sgd":
        name += f" m{fmt(mom, 2)}"
    return f"{name} lr {fmt(float(get('lr', math.nan) or math.nan))}"


def loss_at(run: Run, step: int) -> float | None:
    """The training loss the run recorded at ``step`` (None when it has not arrived)."""
    buf = run.buffer
    if buf is None or not len(buf):
        return None
    row = int(step) - int(buf.first_step)
    if not 0 <= row < len(buf):
        return None
    return float(buf.view(row, row + 1)["loss"][0])


class SurfacePanel(LabPanel):
    """The contour map, the live path, kept paths, pace and a readout."""

    def __init__(self, lab: Lab, parent: QWidget | None = None):
        super().__init__(lab, parent)
        self.setObjectName("surfacePanel")
        self.surface: dict[str, Any] | None = None
        self.kept: list[KeptPath] = []
        self._surface_key: Any = None
        self._run: Any = None
        self._drawn = -1
        self._isos: list[Any] = []
        self._label = ""

        self.title = QLabel("")
        self.title.setObjectName("surfaceTitle")
        self.hint = note_label("Open a 2-D surface example to watch the optimizer's path across the loss "
                               "surface: how the learning rate, momentum and Adam move the point.")
        self.examples = QComboBox()
        self.examples.setObjectName("surfaceExamples")
        self.open_button = QPushButton("Open")
        self.open_button.setObjectName("surfaceOpen")
        self.open_button.setAutoDefault(False)
        ex_row = QHBoxLayout()
        ex_row.addWidget(self.examples, 1)
        ex_row.addWidget(self.open_button)
        self._fill_examples()

        self.plot = lab_plot("x", "y")
        self.plot.setObjectName("surfacePlot")
        self.plot.setMinimumHeight(260)
        self.legend = add_legend(self.plot, "bottom-right")
        p = self.plot.getPlotItem()
        self.image = pg.ImageItem(axisOrder="row-major")
        self.image.setZValue(-20)
        p.addItem(self.image)
        self.minima = pg.ScatterPlotItem(symbol="star", size=18, brush=pg.mkBrush(theme.YELLOW),
                                         pen=pg.mkPen(theme.BLACK, width=1.2), name="minimum")
        self.minima.setZValue(8)
        p.addItem(self.minima)
        self.path = p.plot(pen=theme.pen(LIVE_COLOUR, 2.2), name="this run")
        self.path.setZValue(10)
        self.start_mark = pg.ScatterPlotItem(symbol="o", size=10, brush=pg.mkBrush(255, 255, 255),
                                             pen=pg.mkPen(theme.BLACK, width=1.5))
        self.start_mark.setZValue(11)
        p.addItem(self.start_mark)
        self.point = pg.ScatterPlotItem(symbol="o", size=14, brush=pg.mkBrush(LIVE_COLOUR),
                                        pen=pg.mkPen(theme.BLACK, width=1.5))
        self.point.setZValue(12)
        p.addItem(self.point)

        self.pace = QComboBox()
        self.pace.setObjectName("surfacePace")
        for text, rate in PACES:
            self.pace.addItem(text, rate)
        self.pace.setToolTip("slow motion: limit training to this many steps a second (changes a run live)")
        self.clear_button = QPushButton("Clear paths")
        self.clear_button.setObjectName("surfaceClear")
        self.clear_button.setToolTip("forget the paths of earlier runs")
        self.clear_button.setAutoDefault(False)
        controls = QHBoxLayout()
        controls.addWidget(QLabel("pace"))
        controls.addWidget(self.pace)
        controls.addStretch(1)
        controls.addWidget(self.clear_button)
        self.readout = note_label("", theme.FOREGROUND, name="surfaceReadout")

        col = QVBoxLayout(self)
        col.setContentsMargins(4, 4, 4, 4)
        col.setSpacing(4)
        col.addWidget(self.title)
        col.addWidget(self.hint)
        col.addLayout(ex_row)
        col.addWidget(self.plot, 1)
        col.addLayout(controls)
        col.addWidget(self.readout)

        self.pace.currentIndexChanged.connect(self._on_pace)
        self.clear_button.clicked.connect(self.clear_paths)
        self.open_button.clicked.connect(self._on_open_example)
        self._show_surface(None)

    def _fill_examples(self) -> None:
        try:
            paths = [p for p in example_paths() if p.stem.startswith("surface_")]
        except (OSError, ModuleNotFoundError):  # examples missing: the picker stays empty
            paths = []
        for p in paths:
            self.examples.addItem(p.stem.replace("surface_", "surface: "), str(p))

    # ---- the surface -------------------------------------------------------------------------------
    def _show_surface(self, surface: dict[str, Any] | None) -> None:
        self.surface = surface
        p = self.plot.getPlotItem()
        for iso in self._isos:
            iso.setParentItem(None)
            if iso.scene() is not None:
                iso.scene().removeItem(iso)
        self._isos = []
        on = surface is not None
        self.plot.setVisible(on)
        self.hint.setVisible(not on)
        self.examples.setVisible(not on and self.examples.count() > 0)
        self.open_button.setVisible(not on and self.examples.count() > 0)
        self.pace.setEnabled(on)
        if surface is None:
            self.title.setText("<b>2-D surface</b>: this script has none")
            self.image.clear()
            self.minima.setData([], [])
            return
        xs, ys, z = surface_grid(surface)
        self._grid = (xs, ys, z)
        log = bool(surface.get("log_levels"))
        zmin = float(np.nanmin(z))
        if log:
            span = float(np.nanmax(z)) - zmin
            shown = np.log10(z - zmin + span * 1e-5)
        else:
            shown = z
        cmap = pg.colormap.get("CET-L12")  # white valleys, blue hills
        lut = cmap.getLookupTable(0.0, 1.0, 256, alpha=False).astype(np.float64)
        lut = 255.0 - (255.0 - lut) * 0.6  # paler, so the paths stay readable on top
        self.image.setImage(shown, autoLevels=True)
        self.image.setLookupTable(lut.astype(np.uint8))
        (x0, x1), (y0, y1) = surface["xlim"], surface["ylim"]
        dx, dy = (x1 - x0) / (len(xs) - 1), (y1 - y0) / (len(ys) - 1)
        self.image.setRect(QRectF(x0 - dx / 2, y0 - dy / 2, x1 - x0 + dx, y1 - y0 + dy))
        for level in contour_levels(z, log):
            iso = pg.IsocurveItem(data=z, level=float(level), pen=theme.pen(theme.GREY, 0.9, alpha=170),
                                  axisOrder="row-major")
            iso.setParentItem(self.image)  # the image's pixel space, so the same transform
            self._isos.append(iso)
        minima = surface.get("minima") or []
        self.minima.setData([m[0] for m in minima], [m[1] for m in minima])
        p.setRange(xRange=(x0, x1), yRange=(y0, y1), padding=0.02)
        name = surface.get("name") or "surface"
        scale = "log-spaced contours" if log else "evenly spaced contours"
        self.title.setText(f"<b>{name}</b> · {scale} · ★ minimum")

    def _current_surface(self) -> tuple[Any, dict[str, Any] | None, Any]:
        """(key, surface, run whose path to draw): the live or last run's, unless the script loaded
        since is another one."""
        run = self.lab.run
        info = self.lab.script_info
        if run is not None and info is not None and same_script(run.script_path, info.path):
            surface = surface_for(info, run)
        else:  # no run, or the last one was of another script: the script loaded now, its knobs as set
            run = None
            surface = (surface_for(info, params=self.lab.script_params())
                       if info is not None and info.surfaces else None)
        key = (str(info.path) if info is not None else None, surface.get("name") if surface is not None else None)
        return key, surface, run

    # ---- the timer ---------------------------------------------------------------------------------
    def tick(self, run: Run | None = None) -> None:
        key, surface, drawn = self._current_surface()
        if key != self._surface_key:
            if self._surface_key is not None and key[1] != self._surface_key[1]:
                self.clear_paths()
                self._run = None  # the last run's path belongs to the surface before: not kept
                for item in (self.path, self.point, self.start_mark):
                    item.setData([], [])
            self._surface_key = key
            self._show_surface(surface)
        if drawn is not self._run:
            self._keep_path()
            self._run = drawn
            self._drawn = -1
            self._label = run_label(drawn.config) if drawn is not None else ""
            self.path.setData([], [])
            self.point.setData([], [])
            self.start_mark.setData([], [])
            if drawn is not None:
                self._set_legend_name(self.path, f"this run: {self._label}")
        if drawn is None or self.surface is None:
            return
        self._draw_live(drawn)

    def _path_of(self, run: Run) -> tuple[np.ndarray, np.ndarray]:
        """The run's path so far (at most MAX_POINTS of it, keeping its shape and its end exactly)."""
        xs, ys = run.probe_values.get("x"), run.probe_values.get("y")
        if not xs or not ys:
            return np.zeros(0), np.zeros(0)
        n = min(len(xs), len(ys))
        x = np.asarray(xs[:n], dtype=np.float64)
        y = np.asarray(ys[:n], dtype=np.float64)
        if n > MAX_POINTS:
            idx = np.unique(np.concatenate((np.linspace(0, n - 1, MAX_POINTS).astype(np.int64), [n - 1])))
            x, y = x[idx], y[idx]
        return x, y

    def _draw_live(self, run: Run) -> None:
        xs = run.probe_values.get("x")
        n = len(xs) if xs else 0
        if n == self._drawn or n == 0:
            return
        self._drawn = n
        x, y = self._path_of(run)
        if not len(x):
            return
        self.path.setData(x, y, connect="finite")
        self.start_mark.setData([x[0]], [y[0]])
        self.point.setData([x[-1]], [y[-1]])
        steps = run.probe_steps
        step = steps[n - 1] if len(steps) >= n else n - 1
        loss = loss_at(run, step)
        tail = f" · loss {fmt(loss, 4)}" if loss is not None else ""
        self.readout.setText(f"<b>step {step:,}</b> · point ({fmt(float(x[-1]), 4)}, {fmt(float(y[-1]), 4)})"
                             f"{tail} · <span style='color:{LIVE_COLOUR}'>{self._label}</span>")

    def _keep_path(self) -> None:
        """Keep the path of the run drawn so far as a faint line (when it has one)."""
        run = self._run
        if run is None or self.surface is None:
            return
        x, y = self._path_of(run)
        if len(x) < 2:
            return
        used = {k.colour for k in self.kept}
        colour = next((c for c in KEPT_COLOURS if c not in used), KEPT_COLOURS[len(self.kept) % len(KEPT_COLOURS)])
        kept = KeptPath(self._label, x, y, colour)
        p = self.plot.getPlotItem()
        kept.curve = p.plot(x, y, pen=theme.pen(colour, 2.0, alpha=170), name=self._label, connect="finite")
        kept.curve.setZValue(4)
        kept.end = pg.ScatterPlotItem([x[-1]], [y[-1]], symbol="o", size=8, brush=pg.mkBrush(colour),
                                      pen=pg.mkPen(255, 255, 255, width=1))
        kept.end.setZValue(5)
        p.addItem(kept.end)
        self.kept.append(kept)
        while len(self.kept) > MAX_KEPT:
            self._remove_kept(self.kept.pop(0))

    def _remove_kept(self, kept: KeptPath) -> None:
        p = self.plot.getPlotItem()
        for item in (kept.curve, kept.end):
            if item is not None:
                p.removeItem(item)
                self.legend.removeItem(item)

    def clear_paths(self) -> None:
        """Forget the kept paths of earlier runs."""
        for k in self.kept:
            self._remove_kept(k)
        self.kept = []

    def _set_legend_name(self, item: Any, name: str) -> None:
        self.legend.removeItem(item)
        self.legend.addItem(item, name)

    # ---- controls ----------------------------------------------------------------------------------
    def run_changed(self, run: Run | None) -> None:
        self.pace.setEnabled(self.surface is not None)

    def _on_pace(self, _index: int) -> None:
        rate = self.pace.currentData()
        self.lab.set_pace(rate)
        self.lab.status("full speed" if rate is None else f"slow motion: {rate:g} steps a second")

    def set_pace(self, steps_per_s: float | None) -> None:
        i = next((k for k, (_, r) in enumerate(PACES) if r == steps_per_s), 0)
        self.pace.setCurrentIndex(i)

    def _on_open_example(self) -> None:
        path = self.examples.currentData()
        if path:
            self.lab.load_script(path)

    def path_points(self) -> tuple[np.ndarray, np.ndarray]:
        """The live path as drawn (for tests)."""
        x, y = self.path.getData()
        return (np.zeros(0), np.zeros(0)) if x is None else (np.asarray(x), np.asarray(y))
