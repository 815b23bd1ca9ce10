"""Is the app pleasant while it trains? GUI stalls, training throughput and redraw cost.

    xvfb-run -a -s "-screen 0 1280x800x24" .venv/bin/python bench/ui_responsiveness.py
    (or QT_QPA_PLATFORM=offscreen .venv/bin/python bench/ui_responsiveness.py)

1. Event-loop stall: while the tiny MLP (10-64-64-1, batch 32; ``bench/tiny_mlp.py``) trains at full
   speed with the main window open and plotting, a 5 ms heartbeat QTimer records how late each
   beat fires: p50 / p99 / max. Goals: p99 <= 16 ms, max <= 50 ms.
2. Throughput: steps/s of that run divided by steps/s of the same engine with no window
   (headless), measured in interleaved blocks in one process so machine noise hits both alike.
   Goal: >= 0.90.
3. Redraw: the GUI thread's time per frame (fold the new rows in, decimate, set the curves, paint
   the plots) with 1e5, 1e6 and 1e7 steps of history, 300 new steps per frame (9,000 steps/s at
   30 frames/s). Goals: <= 8 ms at 1e6, <= 12 ms at 1e7.

Options: ``--rounds N`` (interleaved blocks, default 4), ``--block S`` (seconds each, default 4),
``--sizes 1e5,1e6,1e7``, ``--threads T`` (torch intra-op threads; default: torch's own).
Uses a temporary run store and settings, never the user's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

_TMP = tempfile.mkdtemp(prefix="lrviz-bench-ui-")
os.environ["LRVIZ_HOME"] = str(Path(_TMP) / "home")
os.environ["XDG_CONFIG_HOME"] = str(Path(_TMP) / "config")
if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from lrviz.ui.app import create_app  # noqa: E402
from lrviz.ui.main_window import MainWindow  # noqa: E402
from lrviz.ui.trace import RunTrace  # noqa: E402
from PySide6.QtCore import QElapsedTimer, QEventLoop, Qt, QTimer  # noqa: E402

from lrviz.config import RunConfig  # noqa: E402
from lrviz.engine import TrainingEngine  # noqa: E402
from lrviz.experiment import load_experiment  # noqa: E402
from lrviz.records import Event, StepBuffer, ValPoint  # noqa: E402
from lrviz.store import RunStore  # noqa: E402

HERE = Path(__file__).parent
WARMUP_STEPS = 300
BIG = 10**9


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_loop(app, seconds: float) -> None:  # noqa: ANN001
    loop = QEventLoop()
    QTimer.singleShot(int(seconds * 1000), loop.quit)
    loop.exec()


class Heartbeat:
    """A 5 ms timer that records how late each beat fires (ms)."""

    def __init__(self, interval_ms: int = 5):
        self.interval = interval_ms
        self.lateness: list[float] = []
        self._clock = QElapsedTimer()
        self._timer = QTimer()
        self._timer.setTimerType(Qt.TimerType.PreciseTimer)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self._on_beat)
        self._last = 0
        self.recording = False

    def start(self) -> None:
        self._clock.start()
        self._last = self._clock.nsecsElapsed()
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()

    def _on_beat(self) -> None:
        now = self._clock.nsecsElapsed()
        if self.recording:
            self.lateness.append(max(0.0, (now - self._last) / 1e6 - self.interval))
        self._last = now


def engine_for(exp, store) -> TrainingEngine:  # noqa: ANN001
    cfg = RunConfig(**exp.defaults).merged({"steps": BIG})
    return TrainingEngine(exp, cfg.validated(), store)


def wait_steps(app, eng: TrainingEngine, n: int, pump: bool) -> None:  # noqa: ANN001
    end = time.monotonic() + 60
    while eng.step < n and time.monotonic() < end:
        if pump:
            app.processEvents()
        time.sleep(0.002)


def measure_block(app, window: MainWindow | None, exp, store, seconds: float,  # noqa: ANN001
                  beat: Heartbeat | None) -> float:
    """Steps/s of one engine over ``seconds`` after a warm-up; with the window when given."""
    eng = engine_for(exp, store)
    if window is not None:
        window.start_engine(eng, "benchmark")
    else:
        eng.start()
    wait_steps(app, eng, WARMUP_STEPS, pump=window is not None)
    s0, t0 = eng.step, time.perf_counter()
    if window is not None:
        if beat is not None:
            beat.recording = True
        run_loop(app, seconds)
        if beat is not None:
            beat.recording = False
    else:
        time.sleep(seconds)
    s1, t1 = eng.step, time.perf_counter()
    eng.stop()
    eng.join(30)
    while eng.is_alive:
        time.sleep(0.005)
    if window is not None:
        run_loop(app, 0.1)  # let the window handle the end of the run
    return (s1 - s0) / (t1 - t0)


def throughput(app, window: MainWindow, rounds: int, block: float) -> dict[str, object]:  # noqa: ANN001
    """Interleaved blocks: headless, with the window, with the window and the 5 ms heartbeat.

    The heartbeat itself takes the GIL 200 times a second, so throughput is compared without it
    and the stalls are measured in blocks of their own.
    """
    exp = load_experiment(HERE / "tiny_mlp.py")
    store = window.store or RunStore(None)
    beat = Heartbeat()
    rates: dict[str, list[float]] = {"headless": [], "gui": [], "gui+beat": []}
    redraws = 0
    kinds = ["headless", "gui", "gui+beat"]
    for i in range(rounds):
        order = kinds if i % 2 == 0 else kinds[::-1]  # neither always goes first
        for kind in order:
            before = window.plots.redraws
            if kind == "gui+beat":
                beat.start()
            rate = measure_block(app, None if kind == "headless" else window, exp, store, block,
                                 beat if kind == "gui+beat" else None)
            beat.stop()
            rates[kind].append(rate)
            if kind == "gui":
                redraws += window.plots.redraws - before
    late = beat.lateness
    head = statistics.mean(rates["headless"])
    return {
        **rates,
        "ratio": statistics.mean(rates["gui"]) / head,
        "ratio_beat": statistics.mean(rates["gui+beat"]) / head,
        "ratios": [g / h for g, h in zip(rates["gui"], rates["headless"])],
        "p50": pct(late, 50), "p99": pct(late, 99), "max": max(late) if late else float("nan"),
        "beats": len(late), "frames_per_s": redraws / (rounds * block),
    }


def synthetic_buffer(n: int, rng: np.random.Generator) -> StepBuffer:
    steps = np.arange(n)
    loss = 2.0 * np.exp(-steps / max(1, n / 5)) + 0.05 + 0.02 * rng.standard_normal(n)
    loss[rng.integers(0, n, 20)] += 5.0  # one-step spikes
    cols = {
        "epoch": (steps // 1000).astype(np.int32),
        "time": steps * 1e-4,
        "loss": loss,
        "grad_norm": np.abs(1 + 0.3 * rng.standard_normal(n)).astype(np.float32),
        "lr": np.full((n, 1), 0.01),
    }
    return StepBuffer.from_columns(cols)


def redraw_cost(app, window: MainWindow, n: int, frames: int = 60, per_frame: int = 300) -> dict[str, float]:  # noqa: ANN001
    rng = np.random.default_rng(0)
    buf = synthetic_buffer(n, rng)
    events = [Event(int(n * f), "set_lr", {"lr": 0.01}) for f in (0.2, 0.5, 0.8)]
    val = [ValPoint(int(s), 0, 0.1, 0.9) for s in np.linspace(0, n - 1, 200)]
    t = time.perf_counter()
    trace = RunTrace(buf, events, val, label="bench", live=True, smoothing=window.plots.smoothing)
    window.plots.set_primary(trace)
    window.plots.refresh(force=True)
    load_s = time.perf_counter() - t
    plots = window.plots
    new = rng.standard_normal(per_frame) * 0.02 + 0.06
    for _ in range(5):  # warm up (and let the buffer grow once)
        for v in new:
            buf.append(0, 0.0, float(v), 1.0, [0.01])
        plots.refresh(force=True)
        plots.view.viewport().repaint()
    times, fold, paint = [], [], []
    for _ in range(frames):
        for v in new:  # the engine's appends: not the GUI thread's cost
            buf.append(0, 0.0, float(v), 1.0, [0.01])
        t0 = time.perf_counter()
        plots.refresh(force=True)
        t1 = time.perf_counter()
        plots.view.viewport().repaint()  # paint now, synchronously
        t2 = time.perf_counter()
        times.append((t2 - t0) * 1e3)
        fold.append((t1 - t0) * 1e3)
        paint.append((t2 - t1) * 1e3)
        app.processEvents()
    # zoomed in on a tenth of the history, panning: the decimation follows the view
    vb = plots.plots["loss"].getViewBox()
    zoom = []
    for k in range(20):
        x0 = n * (0.3 + 0.01 * k)
        vb.setXRange(x0, x0 + n / 10, padding=0)
        t0 = time.perf_counter()
        plots.refresh(force=True)
        plots.view.viewport().repaint()
        zoom.append((time.perf_counter() - t0) * 1e3)
    plots.reset_view()
    plots.set_primary(None)
    return {"n": n, "load_s": load_s, "p50": pct(times, 50), "p95": pct(times, 95), "max": max(times),
            "fold_p50": pct(fold, 50), "paint_p50": pct(paint, 50), "zoom_p50": pct(zoom, 50)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--block", type=float, default=4.0)
    ap.add_argument("--sizes", default="1e5,1e6,1e7")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    app = create_app()
    window = MainWindow()
    window.resize(1280, 800)
    window.show()
    run_loop(app, 0.5)
    print(f"lrviz UI responsiveness — Qt platform {app.platformName()}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, plot area {window.plots.view.width()}x"
          f"{window.plots.view.height()} px")

    if not args.skip_throughput:
        r = throughput(app, window, args.rounds, args.block)
        print("\nTraining the tiny MLP at full speed with the window open and plotting "
              f"({args.rounds} x {args.block:g} s blocks each, interleaved):")
        print(f"  headless engine      {statistics.mean(r['headless']):8.0f} steps/s  "
              f"(blocks: {', '.join(f'{x:.0f}' for x in r['headless'])})")
        print(f"  with the window      {statistics.mean(r['gui']):8.0f} steps/s  "
              f"(blocks: {', '.join(f'{x:.0f}' for x in r['gui'])})")
        print(f"  throughput ratio     {r['ratio']:8.3f}           (goal >= 0.90; per pair: "
              f"{', '.join(f'{x:.2f}' for x in r['ratios'])})")
        print(f"  redraws              {r['frames_per_s']:8.1f} /s")
        print(f"  with the heartbeat   {statistics.mean(r['gui+beat']):8.0f} steps/s  "
              f"(ratio {r['ratio_beat']:.3f}: the 5 ms timer itself takes the GIL 200 times a second)")
        print(f"  heartbeat lateness   p50 {r['p50']:.2f} ms   p99 {r['p99']:.2f} ms   max {r['max']:.2f} ms  "
              f"({r['beats']} beats; goals p99 <= 16, max <= 50)")

    print("\nRedraw per frame (fold 300 new steps, decimate, set curves, paint), full view:")
    goals = {10**6: 8.0, 10**7: 12.0}
    for text in args.sizes.split(","):
        n = int(float(text))
        r = redraw_cost(app, window, n)
        goal = goals.get(n)
        g = f"   (goal <= {goal:g} ms)" if goal else ""
        print(f"  {n:>10,} steps: p50 {r['p50']:6.2f} ms  p95 {r['p95']:6.2f} ms  max {r['max']:6.2f} ms  "
              f"[update {r['fold_p50']:.2f} + paint {r['paint_p50']:.2f}; zoomed/panning p50 "
              f"{r['zoom_p50']:.2f} ms; first load {r['load_s']:.2f} s]{g}")
    window.shutdown()
    window.close()
    sys.stdout.flush()
    # PySide6 6.12 can crash while tearing down pyqtgraph's scene at interpreter exit; the figures
    # are printed, so leave without running Qt's destructors.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
