"""Take the learning-rate lab's screenshots from a real window (run it under a display, e.g. Xvfb).

    xvfb-run -a -s "-screen 0 1280x800x24" .venv/bin/python bench/lab_screenshots.py [OUT_DIR]

Writes into OUT_DIR (default ``docs/``):

- ``screenshot-range-test.png``: an LR range test with its suggestion band, confirmed, then a run at the rate it chose;
- ``screenshot-sweep.png``: a sweep of five rates overlaid, with its table (the highest diverges);
- ``screenshot-divergence.png``: a divergence caught mid-run, with the banner explaining it;
- ``screenshot-surface.png``: Rosenbrock's valley with the paths of SGD, SGD with momentum and Adam;
- ``screenshot-diagnostics.png``: a tiny GPT-like transformer (``bench/tiny_gpt.py``) trained with AdamW,
  with the Diagnostics panel: the generalization verdict and each layer's update-to-weight ratio.

Uses a temporary run store and settings, never the user's.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

_TMP = tempfile.mkdtemp(prefix="lrviz-lab-shots-")
os.environ["LRVIZ_HOME"] = str(Path(_TMP) / "home")
os.environ["XDG_CONFIG_HOME"] = str(Path(_TMP) / "config")

import torch  # noqa: E402
from lrviz.ui.app import create_app  # noqa: E402
from lrviz.ui.main_window import MainWindow  # noqa: E402
from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

RIGHT_WIDTH = 500


def wait(app: QApplication, pred, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError("the window did not get there in time")
        app.processEvents()
        time.sleep(0.005)


def settle(app: QApplication, seconds: float = 0.4) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)


def layout(w: MainWindow, panel: str) -> None:
    """Controls narrow, the lab panel wide, the script notes short."""
    w.lab.show_panel(panel)
    dock = w.lab.docks[panel]
    w.resizeDocks([w.controls_dock, dock], [285, RIGHT_WIDTH], Qt.Orientation.Horizontal)
    w.resizeDocks([w.notes_dock, dock], [150, 560], Qt.Orientation.Vertical)


def load(app: QApplication, w: MainWindow, name: str) -> None:
    w.load_script(name)
    wait(app, lambda: w.experiment is not None and w.experiment.name in (name, Path(name).stem)
         and not w._loader.is_alive())
    settle(app, 0.2)


def shot(app: QApplication, w: MainWindow, path: Path) -> None:
    settle(app, 0.5)
    w.grab().save(str(path))
    print(f"wrote {path}")


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    app = create_app()
    w = MainWindow()
    w.resize(1280, 800)
    w.move(0, 0)
    w.show()
    lab = w.lab

    # 1. The range test on a fresh model, then a run at the rate it suggests.
    load(app, w, "regression")
    layout(w, "Range test")
    assert lab.range_test.run_test()
    wait(app, lambda: not lab.range_test.busy())
    if lab.range_test.result.confirmation is None:  # not confirmed by default: cheaper than the test
        assert lab.range_test.confirm_now()
        wait(app, lambda: not lab.range_test.busy())
    lab.range_test.use_button.click()
    w.controls.length.setValue(1500)
    assert w.start_run()
    wait(app, lambda: w._end_handled)
    shot(app, w, out / "screenshot-range-test.png")

    # 2. A sweep of five rates, overlaid, with its table.
    layout(w, "Sweep")
    lab.sweep.lrs.setText("1e-3:3:5")
    lab.sweep.steps.setValue(400)
    assert lab.sweep.run_sweep()
    wait(app, lambda: not lab.sweep.busy())
    lab.sweep.overlay_button.click()  # the rates that did not diverge, in the main plots too
    w.log_checks["loss"].setChecked(True)
    shot(app, w, out / "screenshot-sweep.png")
    w.log_checks["loss"].setChecked(False)
    w.overlay_runs([])

    # 3. A divergence caught mid-run: the rate raised to 2 at step ~300 of a healthy run.
    w.controls.lr.set_value(0.05)
    w.controls.length.setValue(3000)
    assert w.start_run()
    eng = w.engine
    wait(app, lambda: eng.step >= 300)
    lab.use_lr(2.0)
    wait(app, lambda: eng.state == "paused" and eng.detection is not None)
    w.lab.show_panel("Diagnostics")
    w.resizeDocks([w.controls_dock, w.lab.docks["Diagnostics"]], [285, 400], Qt.Orientation.Horizontal)
    shot(app, w, out / "screenshot-divergence.png")
    w.shutdown_engine()
    wait(app, lambda: w._end_handled)

    # 4. Rosenbrock's valley: SGD, SGD with momentum, then Adam in slow motion.
    load(app, w, "surface_rosenbrock")
    layout(w, "Surface")
    assert w.start_run()
    wait(app, lambda: w._end_handled)
    w.controls.momentum.setText("0.9")
    assert w.start_run()
    wait(app, lambda: w._end_handled)
    w.controls.optimizer.setCurrentText("adam")
    w.controls.lr.set_value(0.05)
    lab.surface.set_pace(200.0)
    assert w.start_run()
    eng = w.engine
    wait(app, lambda: eng.step >= 420)
    shot(app, w, out / "screenshot-surface.png")
    lab.surface.set_pace(None)
    w.shutdown_engine()
    wait(app, lambda: w._end_handled)

    # 5. Diagnostics of a tiny GPT-like transformer trained with AdamW.
    gpt = Path(__file__).resolve().with_name("tiny_gpt.py")
    w.load_script(str(gpt))
    wait(app, lambda: w.experiment is not None and w.experiment.path == gpt and not w._loader.is_alive())
    settle(app, 0.2)
    layout(w, "Diagnostics")
    w.resizeDocks([w.notes_dock, w.lab.docks["Diagnostics"]], [110, 600], Qt.Orientation.Vertical)
    assert w.start_run()
    wait(app, lambda: w._end_handled, 600)
    shot(app, w, out / "screenshot-diagnostics.png")
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
