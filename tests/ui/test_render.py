"""Tests of the static plot renderer (lrviz.ui.render): PNG, SVG and PDF offscreen, decimation, smoothing."""

from __future__ import annotations

import logging
import math
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from lrviz.ui.render import RunData, peak_decimate, render_bytes, render_run
from PySide6.QtGui import QImage

from lrviz import export
from lrviz.errors import ConfigError
from lrviz.records import Event, ValPoint
from lrviz.store.runs import RunStore

# Before pytest-qt creates the QApplication: no display needed.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

log = logging.getLogger(__name__)
SVG = "{http://www.w3.org/2000/svg}"


def run_data(n: int = 2000, groups: int = 1, seed: int = 0, label: str = "run") -> RunData:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    loss = 0.1 + 2.0 * np.exp(-t / (n / 5)) + rng.normal(0, 0.05, n) ** 2
    lr = np.empty((n, groups))
    for g in range(groups):
        lr[:, g] = 0.1 / (g + 1) * (0.5 + 0.5 * np.cos(np.pi * t / n)) + 1e-5
    steps = {
        "step": t.astype(np.int64), "epoch": (t // 500).astype(np.int32), "time": t * 0.01, "loss": loss,
        "grad_norm": np.ones(n, np.float32), "lr": lr,
    }
    events = [
        Event(n // 4, "set_lr", {"lr": 0.03}, 1.0),
        Event(n // 2, "pause", {}, 2.0),
        Event(n // 2, "resume", {}, 3.0),
        Event(3 * n // 4, "set_schedule", {"spec": "CosineAnnealingLR:T_max=500"}, 4.0),
    ]
    val = [ValPoint(int(s), 0, float(loss[s]) * 1.1, 0.9, 0.0) for s in range(n // 10 - 1, n, n // 10)]
    return RunData(label, steps, events, val)


@pytest.fixture(autouse=True)
def _app(qapp):
    return qapp


def test_png(tmp_path: Path):
    path = render_run(run_data(groups=2), tmp_path / "both.png", title="mnist.py · sgd lr=0.1", kind="both")
    image = QImage()
    assert image.load(str(path))
    assert (image.width(), image.height()) == (1200, 800)
    colours = {image.pixel(x, y) for x in range(0, 1200, 7) for y in range(0, 800, 7)}
    assert len(colours) > 20
    assert path.stat().st_size > 20_000


def test_png_size_follows_the_request(tmp_path: Path):
    data = render_bytes(run_data(), "png", kind="loss", size=(640, 400))
    image = QImage()
    assert image.loadFromData(data, "PNG")
    assert (image.width(), image.height()) == (640, 400)


def test_svg_is_xml_with_paths_and_labels(tmp_path: Path):
    path = render_run(run_data(), tmp_path / "plot.svg", kind="both", title="svg test")
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    assert len(root.findall(f".//{SVG}path")) >= 5
    text = "".join(root.itertext())
    for label in ("train loss", "learning rate", "step (optimizer updates)", "validation loss", "svg test"):
        assert label in text
    assert root.get("viewBox") == "0 0 1200 800"


def test_pdf(tmp_path: Path):
    path = render_run(run_data(), tmp_path / "plot.pdf", kind="lr", title="pdf test")
    data = path.read_bytes()
    assert data.startswith(b"%PDF")
    assert len(data) > 5_000
    assert b"%%EOF" in data[-64:]


def test_overlay_of_several_runs(tmp_path: Path):
    runs = [run_data(seed=i, label=f"run {i}") for i in range(3)]
    runs[2].events.append(Event(1500, "diverged", {"message": "loss is inf"}, 5.0))
    root = ET.fromstring(render_bytes(runs, "svg", kind="both", title="three runs"))
    text = "".join(root.itertext())
    for i in range(3):
        assert f"run {i}" in text
    assert "diverged" in text


def test_markers_are_labelled(tmp_path: Path):
    text = "".join(ET.fromstring(render_bytes(run_data(), "svg", kind="loss")).itertext())
    assert "lr 0.03" in text and "paused" in text and "CosineAnnealingLR" in text
    assert "resume" not in text
    assert "smoothed (0.60)" in text  # the app's default smoothing, also for headless exports


def test_each_kind_and_empty_or_broken_runs(tmp_path: Path):
    empty = RunData("empty", RunStore._empty(None, None))
    broken = run_data(500)
    steps = {k: np.array(v) for k, v in broken.steps.items()}
    steps["loss"][300:] = np.inf
    steps["loss"][250:260] = np.nan
    steps["lr"][100:120] = 0.0
    broken = RunData("broken", steps, [Event(300, "diverged", {}, 0.0)], [])
    for data in (empty, broken, [empty, broken]):
        for kind in ("loss", "lr", "both"):
            image = QImage()
            assert image.loadFromData(render_bytes(data, "png", kind=kind, size=(400, 300)), "PNG")
    text = "".join(ET.fromstring(render_bytes(empty, "svg", kind="loss")).itertext())
    assert "no steps recorded" in text


def test_million_steps_render_fast(tmp_path: Path):
    """A million steps render in about the time of two thousand (decimated: the figure's own set-up
    dominates), bounded relative to that render on this machine, not by wall-clock seconds."""
    small = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        render_run(run_data(2000), tmp_path / "small.svg", kind="both", title="2e3 steps")
        small = min(small, time.perf_counter() - t0)
    n = 1_000_000
    data = run_data(n)
    data.steps["loss"][600_000] = 50.0  # a single-step spike
    t0 = time.perf_counter()
    path = render_run(data, tmp_path / "big.svg", kind="both", title="1e6 steps")
    elapsed = time.perf_counter() - t0
    print(f"render 1e6 steps (svg, both plots): {elapsed:.2f} s, {path.stat().st_size / 1e3:.0f} kB; "
          f"2e3 steps: {small:.2f} s")
    log.info("render 1e6 steps: %.2f s (2e3 steps: %.2f s)", elapsed, small)
    assert elapsed < 10 * small, (elapsed, small)
    assert path.stat().st_size < 2_000_000  # decimated: not a million points
    t0 = time.perf_counter()
    render_run(data, tmp_path / "big.png", kind="both")
    print(f"render 1e6 steps (png, both plots): {time.perf_counter() - t0:.2f} s")


def test_unwritable_path_raises_and_leaves_no_file(tmp_path: Path, monkeypatch):
    with pytest.raises(ConfigError, match="does not exist"):
        render_run(run_data(200), tmp_path / "missing" / "plot.png")
    assert not (tmp_path / "missing").exists()

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(export.os, "open", denied)
    with pytest.raises(ConfigError, match="permission denied — choose another folder"):
        render_run(run_data(200), tmp_path / "plot.pdf")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments():
    with pytest.raises(ConfigError, match="png, svg or pdf"):
        render_bytes(run_data(100), "gif")
    with pytest.raises(ConfigError, match="loss, lr or both"):
        render_bytes(run_data(100), "png", kind="grad")
    with pytest.raises(ConfigError, match="nothing to plot"):
        render_bytes([], "png")
    with pytest.raises(ConfigError, match="plot format"):
        render_run(run_data(100), "noext")


def test_export_run_writes_plots(tmp_path: Path):
    store = RunStore(tmp_path / "store")
    try:
        data = run_data(300, groups=2)
        run_id = store.create_run(script_path="/x/mnist.py", script_hash="h", config={"lr": 0.1, "optimizer": "sgd"},
                                  device="cpu", name="r1")
        store.append_steps(run_id, 0, {k: v for k, v in data.steps.items() if k != "step"})
        store.add_events(run_id, data.events)
        store.add_validation(run_id, data.validation)
        paths = export.export_run(store, run_id, tmp_path / "out", formats=("png", "svg", "pdf", "csv", "json"))
    finally:
        store.close()
    names = [p.name for p in paths]
    assert names == ["metrics.csv", "run.json", "loss.png", "lr.png", "loss.svg", "lr.svg", "loss.pdf", "lr.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)
    title = "".join(ET.parse(tmp_path / "out" / "loss.svg").getroot().itertext())
    assert "r1 — mnist.py" in title and "sgd lr=0.1" in title


# --------------------------------------------------------------------------- data reduction


def test_peak_decimation_keeps_spikes_and_order():
    n = 100_000
    x = np.arange(n, dtype=float)
    y = np.sin(x / 5000)
    y[12_345] = 99.0
    y[54_321] = -99.0
    xs, ys = peak_decimate(x, y, 500)
    assert len(xs) <= 1000
    assert ys.max() == 99.0 and ys.min() == -99.0
    assert np.all(np.diff(xs) >= 0)
    assert 12_345 in xs and 54_321 in xs


def test_peak_decimation_non_finite():
    y = np.ones(10_000)
    y[:200] = np.nan  # a whole bin without finite values becomes a gap
    y[5000] = np.inf
    xs, ys = peak_decimate(np.arange(10_000), y, 100)
    assert np.isnan(ys[0]) and np.isnan(ys[1])
    assert np.nanmax(ys) == 1.0  # inf is never picked over finite values
    short_x, short_y = peak_decimate(np.arange(10), np.arange(10.0), 100)
    assert len(short_x) == 10


def test_a_new_plot_panel_is_one_table_entry(monkeypatch):
    """One PlotPanel entry naming a recorded column: the live plots and the exported figure both get the
    panel, with its title, and both draw that column."""
    from lrviz.ui import render
    from lrviz.ui.plots import TrainingPlots
    from lrviz.ui.trace import RunTrace

    from lrviz.records import StepBuffer

    title = "epoch (test)"
    monkeypatch.setattr(export, "PLOT_PANELS", (*export.PLOT_PANELS, export.PlotPanel("epochs", title, column="epoch")))
    buf = StepBuffer(groups=1, capacity=16)
    for i in range(300):
        buf.append(i // 100, i * 0.01, 1.0 / (i + 1), 0.5, [0.1])

    plots = TrainingPlots()
    try:
        assert plots.PLOTS[-1] == "epochs" and "epochs" in plots._shown
        assert plots.plots["epochs"].getAxis("left").labelText == title
        plots.set_primary(RunTrace(buf))
        assert plots.refresh(force=True)
        x, y = plots.primary.curves["epoch"].getData()
        assert len(x) and set(np.unique(y)) == {0.0, 1.0, 2.0}
        assert plots.figure_spec().panels[-1] == "epochs"
    finally:
        plots.close()

    data = RunData("run", {k: np.array(v) for k, v in buf.view().items()})
    fig = render._Figure([data], export.FigureSpec(panels=("loss", "epochs")), size=(800, 600))
    try:
        assert fig.plots["epochs"].getAxis("left").labelText == title
        (curve,) = fig.plots["epochs"].listDataItems()
        assert set(np.unique(curve.getData()[1])) == {0.0, 1.0, 2.0}
    finally:
        fig.close()
    svg = ET.fromstring(render_bytes(data, "svg", figure=export.FigureSpec(panels=("loss", "epochs"))))
    assert title in "".join(svg.itertext())
