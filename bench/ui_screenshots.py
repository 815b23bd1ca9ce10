"""Take the README's screenshots from a real window (run it under a display, e.g. Xvfb).

    xvfb-run -a -s "-screen 0 1280x800x24" .venv/bin/python bench/ui_screenshots.py [OUT_DIR]

Writes ``screenshot-training.png`` (mid-training, after an LR change and a schedule, with the
markers) and ``screenshot-overlay.png`` (three runs overlaid) into OUT_DIR (default ``docs/``).
Uses a temporary run store and settings, never the user's.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

_TMP = tempfile.mkdtemp(prefix="lrviz-shots-")
os.environ["LRVIZ_HOME"] = str(Path(_TMP) / "home")
os.environ["XDG_CONFIG_HOME"] = str(Path(_TMP) / "config")

from lrviz.ui.app import create_app  # noqa: E402
from lrviz.ui.main_window import MainWindow  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402


def wait(app: QApplication, pred, timeout: float = 120.0) -> bool:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        app.processEvents()
        time.sleep(0.005)
    return True


def settle(app: QApplication, seconds: float = 0.4) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs")
    out.mkdir(parents=True, exist_ok=True)
    app = create_app()
    w = MainWindow()
    w.resize(1280, 800)
    w.move(0, 0)
    w.show()

    # 1. Mid-training, after an LR change and a schedule.
    w.load_script("classification")
    assert wait(app, lambda: w.experiment is not None), w.messages
    w.controls.length.setValue(60)  # epochs
    assert w.start()
    eng = w.engine
    assert wait(app, lambda: eng.step >= 150)
    w.controls.lr.edit.setText("0.3")
    w.controls.lr._on_commit()
    assert wait(app, lambda: eng.step >= 330)
    total = eng.total_steps or 960
    w.controls.schedule.set_spec(f"CosineAnnealingLR:T_max={total - eng.step},eta_min=0.001")
    w.controls.schedule.apply_button.click()
    assert wait(app, lambda: eng.step >= 420)
    w.pause()
    assert wait(app, lambda: eng.state == "paused")
    settle(app, 0.3)
    w.resume()
    assert wait(app, lambda: eng.step >= 1100), (eng.state, eng.step, eng.events[-3:], w.messages)
    w.plots.show_crosshair(300)
    settle(app, 0.25)
    w.grab().save(str(out / "screenshot-training.png"))
    w.shutdown_engine()
    settle(app, 0.3)

    # 2. Three runs of the regression toy at different rates, overlaid.
    w.load_script("regression")
    assert wait(app, lambda: w.experiment is not None and w.experiment.name == "regression"), w.messages
    w.controls.length.setValue(1500)
    ids = []
    for lr in ("0.003", "0.01", "0.05"):
        w.controls.lr.edit.setText(lr)
        assert w.start()
        assert wait(app, lambda: w._end_handled, 300)
        ids.append(w.engine.run_id)
    if w.run_browser is not None:
        w.run_browser.refresh()
        w.run_browser.select_runs(ids)
        w.run_browser.overlay_button.click()
    else:
        w.overlay_runs(ids)
    w.log_checks["loss"].setChecked(True)
    settle(app, 0.5)
    w.plots.show_crosshair(400)
    settle(app, 0.3)
    w.grab().save(str(out / "screenshot-overlay.png"))
    w.close()
    print(f"wrote {out / 'screenshot-training.png'} and {out / 'screenshot-overlay.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
