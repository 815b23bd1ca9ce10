"""Take the README's screenshots of the main window from a real window (under a display, e.g. Xvfb).

    xvfb-run -a -s "-screen 0 1280x800x24" .venv/bin/python bench/ui_screenshots.py [--out DIR] [--only NAME,...]

Writes into DIR (default ``docs/``):

- ``screenshot-training.png``: a run started from the window, mid-training, after an LR change and
  a schedule, with the markers;
- ``screenshot-overlay.png``: two runs of the window and one TensorBoard log of a plain torch loop
  (``lrviz import``, every 10th step) overlaid;
- ``screenshot-watch.png``: the window watching a run started from a terminal (``lrviz run
  regression …``, then Watch in the run browser), after steering its rate from the window.

Uses a temporary run store and settings, never the user's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
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

from lrviz.live.connection import live_runs  # noqa: E402
from lrviz.states import RunState  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def wait(app: QApplication, pred, timeout: float = 300.0) -> bool:  # noqa: ANN001
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


def load(app: QApplication, w: MainWindow, name: str) -> None:
    w.load_script(name)
    assert wait(app, lambda: w.script_info is not None and w.script_info.name == name), w.messages


def set_lr(app: QApplication, w: MainWindow, text: str) -> None:
    n = len(w.runs.answers)
    w.controls.lr.edit.setText(text)
    w.controls.lr._on_commit()
    if w.is_active():
        assert wait(app, lambda: len(w.runs.answers) > n), w.messages


def training(app: QApplication, w: MainWindow, out: Path) -> None:
    """Mid-training, after an LR change and a schedule."""
    load(app, w, "classification")
    w.controls.length.setValue(60)  # epochs
    assert w.start()
    run = w.run
    assert wait(app, lambda: run.step >= 150)
    set_lr(app, w, "0.3")
    assert wait(app, lambda: run.step >= 330)
    total = run.total_steps or 960
    w.controls.schedule.set_spec(f"CosineAnnealingLR:T_max={total - run.step},eta_min=0.001")
    w.controls.schedule.apply_button.click()
    assert wait(app, lambda: run.step >= 420)
    w.runs.pause()
    assert wait(app, lambda: run.state == RunState.PAUSED)
    settle(app, 0.3)
    w.runs.resume()
    assert wait(app, lambda: run.step >= 1100), (run.state, run.step, run.events[-3:], w.messages)
    w.plots.show_crosshair(300)
    w.runs_dock.raise_()  # the run list (the lab's last panel is raised at the first start)
    settle(app, 0.25)
    w.grab().save(str(out / "screenshot-training.png"))
    w.shutdown(30)
    settle(app, 0.3)


#: A user's own loop on the regression toy, logging to TensorBoard every 10th step (run in a process of
#: its own: the app's process never imports torch).
TB_LOOP = """
import sys, torch
from torch.utils.tensorboard import SummaryWriter
from lrviz.examples import resolve_script
import runpy
exp = runpy.run_path(str(resolve_script("regression")))
torch.manual_seed(0)
model = exp["build_model"](); train, _ = exp["build_data"](64)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
step = 0
with SummaryWriter(sys.argv[1]) as tb:
    while step < 1500:
        for x, y in train:
            loss = exp["loss_fn"](model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            if step % 10 == 0:
                tb.add_scalar("train/loss", loss.item(), step); tb.add_scalar("lr", 0.01, step)
            step += 1
            if step == 1500:
                break
"""


def overlay(app: QApplication, w: MainWindow, out: Path) -> None:
    """Two runs of the regression toy at different rates and a TensorBoard log of a plain loop, overlaid."""
    load(app, w, "regression")
    w.controls.length.setValue(1500)
    ids = []
    for lr in ("0.003", "0.05"):
        set_lr(app, w, lr)
        assert w.start()
        assert wait(app, lambda: not w.is_active())
        ids.append(w.run.run_id)
    logs = Path(_TMP) / "tb" / "plain loop lr 0.01"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", TB_LOOP, str(logs)], cwd=ROOT, env=env, check=True)
    subprocess.run([sys.executable, "-m", "lrviz", "import", str(logs), "--store", str(w.store_path)], cwd=ROOT,
                   env=env, check=True, stdout=subprocess.DEVNULL)
    w.run_browser.refresh()
    ids.insert(1, max(r.id for r in w.store.list_runs()))
    w.run_browser.select_runs(ids)
    w.run_browser.overlay_button.click()
    w.runs_dock.raise_()  # the list, with the imported run marked
    w.log_checks["loss"].setChecked(True)
    settle(app, 0.5)
    w.plots.show_crosshair(400)
    settle(app, 0.3)
    w.grab().save(str(out / "screenshot-overlay.png"))
    w.log_checks["loss"].setChecked(False)
    w.overlay_runs([])


def watch(app: QApplication, w: MainWindow, out: Path) -> None:
    """A run started from a terminal, watched from the run browser and steered from the window."""
    store = Path(w.store_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lrviz", "run", "regression", "--steps", "200000", "--lr", "0.01",
           "--store", str(store.parent), "--name", "from the terminal", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait(app, lambda: bool(live_runs(store)) or proc.poll() is not None), "not live"
        assert proc.poll() is None, proc.stderr.read()
        run_id = next(iter(live_runs(store)))
        assert wait(app, lambda: (w.store.get_run(run_id).steps or 0) >= 1500)
        w.run_browser.refresh()
        w.run_browser.select_runs([run_id])
        w.run_browser.watch_button.click()
        assert wait(app, lambda: w.run is not None and w.run.run_id == run_id), w.messages
        run = w.run
        assert wait(app, lambda: w.script_info is not None and w.script_info.name == "regression")
        assert wait(app, lambda: run.step >= 2500)
        set_lr(app, w, "0.05")
        assert wait(app, lambda: run.step >= 4000 or run.done.is_set()), (run.state, run.error)
        w.run_browser.refresh()
        w.run_browser.select_runs([run_id])
        w.plots.show_crosshair(3000)
        settle(app, 0.5)
        w.grab().save(str(out / "screenshot-watch.png"))
        w.runs.stop()
        assert wait(app, lambda: not w.is_active())
    finally:
        proc.kill()


SHOTS = {"training": training, "overlay": overlay, "watch": watch}


def open_window() -> tuple[QApplication, MainWindow]:
    """The app and its main window, shown at 1280x800 in the screen's corner."""
    app = create_app()
    w = MainWindow()
    w.resize(1280, 800)
    w.move(0, 0)
    w.show()
    return app, w


def run_shots(shots: dict, description: str, pattern: str = "screenshot-{}.png") -> int:  # noqa: ANN001
    """Parse ``--out``/``--only``, show a 1280x800 window at the screen's corner, take ``shots`` in turn."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--only", default=",".join(shots))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    app, w = open_window()
    for name in args.only.split(","):
        t = time.monotonic()
        shots[name](app, w, out)
        print(f"wrote {out / pattern.format(name)} ({time.monotonic() - t:.0f} s)")
    w.shutdown(30)
    w.close()
    return 0


def main() -> int:
    return run_shots(SHOTS, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
