"""Take the learning-rate lab's screenshots from a real window (run it under a display, e.g. Xvfb).

    xvfb-run -a -s "-screen 0 1280x800x24" .venv/bin/python bench/lab_screenshots.py [OUT_DIR]

Writes into OUT_DIR (default ``docs/``):

- ``screenshot-range-test.png``: an LR range test with its suggestion band, confirmed, then a run at the rate it chose;
- ``screenshot-sweep.png``: a sweep of five rates overlaid, with its table (the highest diverges);
- ``screenshot-divergence.png``: a divergence caught mid-run, with the banner explaining it;
- ``screenshot-surface.png``: Rosenbrock's valley with the paths of SGD, SGD with momentum and Adam;
- ``screenshot-diagnostics.png``: a tiny GPT-like transformer (``bench/tiny_gpt.py``) trained with AdamW,
  with the Diagnostics panel: the generalization verdict and each layer's update-to-weight ratio.

Every run is a child process of the app, as in use. Uses a temporary run store and settings, never the
user's.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lrviz.ui.main_window import MainWindow  # noqa: E402
from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402
from ui_screenshots import ROOT, open_window, settle  # noqa: E402  (sets a temporary LRVIZ_HOME)
from ui_screenshots import wait as wait_until  # noqa: E402

from lrviz.states import RunState  # noqa: E402

RIGHT_WIDTH = 500


def wait(app: QApplication, pred, timeout: float = 120.0) -> None:  # noqa: ANN001
    if not wait_until(app, pred, timeout):
        raise TimeoutError("the window did not get there in time")


def layout(w: MainWindow, panel: str) -> None:
    """Controls narrow, the lab panel wide, the script notes short."""
    w.lab.show_panel(panel)
    dock = w.lab.docks[panel]
    w.resizeDocks([w.controls_dock, dock], [285, RIGHT_WIDTH], Qt.Orientation.Horizontal)
    w.resizeDocks([w.notes_dock, dock], [150, 560], Qt.Orientation.Vertical)


def load(app: QApplication, w: MainWindow, script: str) -> None:
    """Load a built-in example (by name) or a script (by path) and wait for the worker's answer."""
    w.load_script(script)
    wanted = Path(script).resolve() if script.endswith(".py") else None
    wait(app, lambda: w.script_info is not None and (w.script_info.name == script if wanted is None
                                                     else Path(w.script_info.path) == wanted))
    settle(app, 0.2)


def start(app: QApplication, w: MainWindow) -> object:
    """Press Start; the run (a child process) the window shows."""
    assert w.start(), w.messages
    return w.run


def finish(app: QApplication, run, timeout: float = 120.0) -> None:
    wait(app, run.done.is_set, timeout)
    settle(app, 0.3)


def stop(app: QApplication, run) -> None:
    run.stop()
    finish(app, run)


def shot(app: QApplication, w: MainWindow, path: Path) -> None:
    settle(app, 0.5)
    w.grab().save(str(path))
    print(f"wrote {path}")


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs"
    out.mkdir(parents=True, exist_ok=True)
    app, w = open_window()
    lab = w.lab

    # 1. The range test on a fresh model (a paused run of its own), then a run at the rate it suggests.
    load(app, w, "regression")
    layout(w, "Range test")
    assert lab.range_test.run_test()
    wait(app, lambda: not lab.range_test.busy())
    lab.range_test.use_button.click()
    w.controls.length.setValue(1500)
    finish(app, start(app, w))
    shot(app, w, out / "screenshot-range-test.png")

    # 2. A sweep of five rates (each a run of its own), overlaid, with its table.
    layout(w, "Sweep")
    lab.sweep.lrs.setText("1e-3:3:5")
    lab.sweep.steps.setValue(400)
    assert lab.sweep.run_sweep()
    wait(app, lambda: not lab.sweep.busy(), 600)
    lab.sweep.overlay_button.click()  # the rates that did not diverge, in the main plots too
    w.log_checks["loss"].setChecked(True)
    shot(app, w, out / "screenshot-sweep.png")
    w.log_checks["loss"].setChecked(False)
    w.overlay_runs([])

    # 3. A divergence caught mid-run: the rate raised to 2 at step ~300 of a healthy run.
    w.controls.lr.set_value(0.05)
    w.controls.length.setValue(3000)
    run = start(app, w)
    wait(app, lambda: run.step >= 300)
    lab.use_lr(2.0)
    wait(app, lambda: run.state == RunState.PAUSED and run.detection is not None and lab.banner.isVisible())
    w.lab.show_panel("Diagnostics")
    w.resizeDocks([w.controls_dock, w.lab.docks["Diagnostics"]], [285, 400], Qt.Orientation.Horizontal)
    shot(app, w, out / "screenshot-divergence.png")
    stop(app, run)

    # 4. Rosenbrock's valley: SGD, SGD with momentum, then Adam in slow motion.
    load(app, w, "surface_rosenbrock")
    layout(w, "Surface")
    finish(app, start(app, w))
    w.controls.momentum.setText("0.9")
    finish(app, start(app, w))
    w.controls.optimizer.setCurrentText("adam")
    w.controls.lr.set_value(0.05)
    lab.surface.set_pace(200.0)
    run = start(app, w)
    wait(app, lambda: run.step >= 420)
    shot(app, w, out / "screenshot-surface.png")
    lab.surface.set_pace(None)
    stop(app, run)

    # 5. Diagnostics of a tiny GPT-like transformer trained with AdamW.
    load(app, w, str(Path(__file__).resolve().with_name("tiny_gpt.py")))
    layout(w, "Diagnostics")
    w.resizeDocks([w.notes_dock, w.lab.docks["Diagnostics"]], [110, 600], Qt.Orientation.Vertical)
    finish(app, start(app, w), 600)
    shot(app, w, out / "screenshot-diagnostics.png")
    w.shutdown(30)
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
