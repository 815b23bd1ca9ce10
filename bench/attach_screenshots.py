"""Screenshots of the app attached to training it did not start: a user's own loop, a Lightning fit, a
Hugging Face ``Trainer`` and rank 0 of a torchrun job, each watched from the run browser and steered
from the window. Taken from the real screen (``import -window root``), so run it under a display::

    xvfb-run -a -s "-screen 0 1280x800x24" .venv/bin/python bench/attach_screenshots.py [--out DIR] [--only NAME,...]

Writes into DIR (default ``docs/``) ``screenshot-attach-NAME.png`` for NAME in:

- ``own-loop``: ``python -m lrviz.resources.examples.own_loop`` (``lrviz.track`` in a plain loop),
  its rate set from the window, so the marker shows against the loop's own cosine schedule;
- ``lightning``: ``python -m lrviz.resources.examples.lightning_loop`` (``LrvizCallback``, two param
  groups), steered from the window;
- ``trainer``: ``python -m lrviz.resources.examples.hf_trainer`` (a tiny GPT-2 built from a config),
  steered from the window;
- ``torchrun``: ``torchrun --nproc_per_node=2 -m lrviz run regression`` (gloo on the CPU), watched
  on rank 0 and steered from the window (the rate lands at the same step on both ranks).

Each training process runs on one torch thread. Uses a temporary run store and settings, never the
user's. Needs ImageMagick's ``import``; the extras ``lightning`` and ``transformers`` for those two.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lrviz.ui.main_window import MainWindow  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402
from ui_screenshots import ROOT, run_shots, set_lr, settle, wait  # noqa: E402  (sets a temporary LRVIZ_HOME)

from lrviz.live.connection import live_runs  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}


def screen(app: QApplication, path: Path) -> None:
    """What the display shows, as a user would see it (the window fills the 1280x800 screen)."""
    settle(app, 0.5)
    subprocess.run(["import", "-window", "root", str(path)], check=True)


def attach(app: QApplication, w: MainWindow, out: Path, name: str, cmd: list[str], *, lr: str,
           before: int, after: int, log_loss: bool = False) -> None:
    """Start ``cmd`` (it trains into the window's store), Watch its run, steer its rate, take the shot."""
    store = w.store_path
    known = set(live_runs(store))
    log = open(Path(store).parent / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait(app, lambda: bool(set(live_runs(store)) - known) or proc.poll() is not None), "never live"
        assert proc.poll() is None, Path(log.name).read_text()[-3000:]
        run_id = next(iter(set(live_runs(store)) - known))
        assert wait(app, lambda: (w.store.get_run(run_id).steps or 0) >= before // 2)
        w.run_browser.refresh()
        w.run_browser.select_runs([run_id])
        w.run_browser.watch_button.click()
        assert wait(app, lambda: w.run is not None and w.run.run_id == run_id), w.messages
        run = w.run
        assert wait(app, lambda: run.step >= before), (run.state, run.step, w.messages)
        set_lr(app, w, lr)
        print(f"  {name}: {w.runs.answers[-1]}")
        assert wait(app, lambda: run.step >= after or run.done.is_set()), (run.state, run.error)
        w.log_checks["loss"].setChecked(log_loss)
        w.run_browser.refresh()
        w.run_browser.select_runs([run_id])
        if w.runs_dock is not None:
            w.runs_dock.raise_()  # the run browser, where the run is marked live
        settle(app, 0.5)
        screen(app, out / f"screenshot-attach-{name}.png")
        w.runs.stop()
        assert wait(app, lambda: not w.is_active())
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def own_loop(app: QApplication, w: MainWindow, out: Path) -> None:
    cmd = [sys.executable, "-m", "lrviz.resources.examples.own_loop", "--epochs", "400", "--store", w.store_path]
    attach(app, w, out, "own-loop", cmd, lr="0.01", before=2500, after=4500, log_loss=True)


def lightning(app: QApplication, w: MainWindow, out: Path) -> None:
    cmd = [sys.executable, "-m", "lrviz.resources.examples.lightning_loop", "--epochs", "300",
           "--store", w.store_path]
    attach(app, w, out, "lightning", cmd, lr="0.01", before=1500, after=2800, log_loss=True)


def trainer(app: QApplication, w: MainWindow, out: Path) -> None:
    cmd = [sys.executable, "-m", "lrviz.resources.examples.hf_trainer", "--steps", "3000", "--store", w.store_path]
    attach(app, w, out, "trainer", cmd, lr="0.0005", before=500, after=900)


def torchrun(app: QApplication, w: MainWindow, out: Path) -> None:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [exe, "--standalone", "--nproc_per_node=2", "-m", "lrviz", "run", "regression", "--steps", "200000",
           "--lr", "0.01", "--device", "cpu", "--store", w.store_path, "--name", "torchrun, 2 ranks", "--quiet"]
    attach(app, w, out, "torchrun", cmd, lr="0.05", before=2500, after=4500, log_loss=True)


SHOTS = {"own-loop": own_loop, "lightning": lightning, "trainer": trainer, "torchrun": torchrun}


def main() -> int:
    return run_shots(SHOTS, __doc__.splitlines()[0], "screenshot-attach-{}.png")


if __name__ == "__main__":
    sys.exit(main())
