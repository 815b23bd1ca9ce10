"""Fixtures for driving the real main window: scripts written to tmp_path, message boxes recorded."""

from __future__ import annotations

import gc
import signal
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from lrviz.ui.main_window import MainWindow  # noqa: E402
from PySide6.QtWidgets import QFileDialog, QMessageBox  # noqa: E402
from window_driving import CHILD_ENV, WAIT_MS  # noqa: E402


@pytest.fixture(autouse=True)
def _gc_on_the_gui_thread():
    """Collect garbage only here, on the GUI thread: with automatic collection on, a full collection
    can run in a training thread and free a Qt widget of an earlier test there (PySide deadlocks
    on it: the GUI thread holds the GIL waiting for a Qt mutex the other thread holds). The app
    needs the same care (pyqtgraph's GarbageCollector)."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()
    gc.collect()



SCRIPT = '''\
"""Tiny test experiment: a linear target learned by a small MLP.

What to try: anything; it trains in well under a second.
"""

import time

import torch
from torch import nn

DEFAULTS = {{"lr": 0.05, "optimizer": "sgd", "steps": {steps}, "seed": 0, "batch_size": 16}}
PARAMS = {{"delay": {delay}}}
DELAY = {delay}


def build_model():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def build_data(batch_size=16, delay={delay}):
    global DELAY
    DELAY = delay
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = x.sum(1, keepdim=True) * 0.5
    train = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, 256, batch_size)]
    return train, [(x[:64], y[:64])]


def loss_fn(output, target):
    if DELAY:
        time.sleep(DELAY)  # slow enough to steer by hand
    return nn.functional.mse_loss(output, target)
'''


@pytest.fixture
def make_script(tmp_path: Path):
    """Write an experiment script: ``make_script(name, steps=..., delay=...)`` or raw ``source=``."""

    def make(name: str = "tiny.py", *, steps: int = 60, delay: float = 0.0, source: str | None = None) -> Path:
        path = tmp_path / name
        text = SCRIPT.format(steps=steps, delay=delay) if source is None else textwrap.dedent(source)
        path.write_text(text)
        return path

    return make


@pytest.fixture
def shown(monkeypatch: pytest.MonkeyPatch) -> list[QMessageBox]:
    """Message boxes the app opened (recorded, never shown, so nothing blocks)."""
    boxes: list[QMessageBox] = []
    monkeypatch.setattr(QMessageBox, "open", lambda self, *a: boxes.append(self))
    monkeypatch.setattr(QMessageBox, "exec", lambda self, *a: boxes.append(self) or 0)
    # pytest-qt closes the window before fixtures are torn down: "stop the run?" must not block
    monkeypatch.setattr(QMessageBox, "question", staticmethod(lambda *a, **k: QMessageBox.StandardButton.Yes))
    for name in ("warning", "critical", "information"):
        monkeypatch.setattr(QMessageBox, name, staticmethod(lambda *a, **k: QMessageBox.StandardButton.Ok))
    return boxes


@pytest.fixture(scope="session")
def pool(tmp_path_factory: pytest.TempPathFactory, session_owned: list):
    """The app's worker pool, shared by the tests (one warm worker waits; each run gets its own, a fork
    of the pool's fork server)."""
    from lrviz.live.child import WorkerPool

    p = WorkerPool(log_dir=tmp_path_factory.mktemp("worker-logs"), env=CHILD_ENV)

    def owned() -> set:  # the warm worker a test's run left behind, and the fork server: the pool's
        w, server = p._spare, p.server
        return ({w, w.pid} if w is not None else set()) | ({server, server.pid} if server is not None else set())

    session_owned.append(owned)
    p.warm()
    yield p
    p.close()
    spare = p._spare
    if spare is not None:
        spare.signal(signal.SIGKILL)
    if p.server is not None:  # it exits once it has reported the spare's end; wait, so it is not orphaned
        p.server.proc.wait(WAIT_MS / 1000)


@pytest.fixture
def window(qtbot, tmp_path: Path, shown, pool):
    """The main window on a run store in tmp_path, shown; the runs it started are stopped at the end."""
    w = MainWindow(store_path=str(tmp_path / "store"), pool=pool)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    yield w
    w.shutdown(10)


@pytest.fixture
def open_script(qtbot, window: MainWindow, monkeypatch: pytest.MonkeyPatch):
    """``open_script(path, ok=True)``: click Open, pick ``path`` in the (patched) file dialog, wait."""
    from PySide6.QtCore import Qt

    def open_(path: Path, ok: bool = True) -> None:
        monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (str(path), "")))
        button = window.toolbar.widgetForAction(window.act_open)
        with qtbot.waitSignal(window.scriptLoaded, timeout=WAIT_MS) as blocker:
            qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
        loaded = blocker.args[0]
        if ok:
            assert loaded == str(Path(path).resolve()), window.messages
        else:
            assert loaded == ""

    return open_


def _drawn_tick_labels(axis) -> list[str]:
    from PySide6.QtGui import QImage, QPainter

    image = QImage(8, 8, QImage.Format.Format_ARGB32)
    painter = QPainter(image)
    try:
        specs = axis.generateDrawSpecs(painter)
    finally:
        painter.end()
    return [text for _, _, text in specs[2] if text] if specs else []


@pytest.fixture
def tick_labels():
    """``tick_labels(axis)``: the tick labels a pyqtgraph AxisItem draws now (from its own draw specs)."""
    return _drawn_tick_labels


@pytest.fixture
def stored_run(window):
    """``stored_run(loss, lr=..., grad_norm=..., events=(), validation=(), name=...)``: a finished run
    with exactly these series, written into the window's store; its id."""
    import numpy as np

    def add(loss, lr=0.1, grad_norm=1.0, events=(), validation=(), name="crafted", script="/x/crafted.py"):
        store = window.store
        loss = np.asarray(loss, dtype=np.float64)
        n = len(loss)
        lr = np.broadcast_to(np.asarray(lr, dtype=np.float64), (n,)).reshape(n, 1).copy()
        run_id = store.create_run(script_path=script, script_hash="h", config={"lr": float(lr[0, 0]),
                                  "optimizer": "sgd"}, device="cpu", name=name)
        store.append_steps(run_id, 0, {
            "epoch": np.zeros(n, np.int32), "time": np.arange(n) * 0.01, "loss": loss,
            "grad_norm": np.broadcast_to(np.asarray(grad_norm, np.float32), (n,)).copy(), "lr": lr})
        store.add_events(run_id, list(events))
        store.add_validation(run_id, list(validation))
        store.set_status(run_id, "running")
        store.set_status(run_id, "finished", summary={"steps": n})
        return run_id

    return add
