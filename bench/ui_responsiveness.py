"""Is the app pleasant while it watches a run? Training throughput, GUI stalls, step-to-screen latency
and redraw cost, with the window attached to a run in another process (the app never trains itself).

    xvfb-run -a -s "-screen 0 1280x800x24" .venv/bin/python bench/ui_responsiveness.py
    (or QT_QPA_PLATFORM=offscreen .venv/bin/python bench/ui_responsiveness.py)

1. Throughput: the tiny MLP (10-64-64-1, batch 32; ``bench/tiny_mlp.py``) trained at full speed by
   a training process of its own, (a) headless: ``lrviz run`` with nobody attached, (b) started
   from the window, which follows it and redraws at up to 30 frames a second. Each block's speed
   comes from the run's own time column (steps after the warm-up / their time), blocks
   interleaved so machine noise hits both alike. Goal: (b)/(a) >= 0.97.
2. Event-loop stall: during (b)-type blocks a 5 ms heartbeat QTimer in the app records how late
   each beat fires: p50 / p99 / max. Goals: p99 <= 16 ms, max <= 50 ms.
3. Step to screen: ``bench/tiny_mlp_clock.py`` records the monotonic clock at the end of every step;
   the window records when each paint ended and the newest step it showed. A step's latency is
   the end of the first paint that showed it minus the end of the step. Goal: p95 <= 100 ms.
4. Redraw: the GUI thread's time per frame (fold the new rows in, decimate, set the curves, paint)
   with 1e5, 1e6 and 1e7 steps of history, 300 new steps per frame.

Options: ``--rounds N`` (default 4), ``--block S`` (seconds, default 4), ``--sizes``, ``--threads T``
(torch threads of the training processes, default 1), ``--skip-throughput``, ``--skip-redraw``.
The app process never imports torch (checked at the end). Uses a temporary run store and
settings, never the user's.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
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
from lrviz.ui import plots as plots_module  # noqa: E402
from lrviz.ui.app import create_app  # noqa: E402
from lrviz.ui.main_window import MainWindow  # noqa: E402
from lrviz.ui.trace import RunTrace  # noqa: E402
from PySide6.QtCore import QElapsedTimer, QEventLoop, Qt, QTimer  # noqa: E402

from lrviz.config import RunConfig  # noqa: E402
from lrviz.live.child import WorkerPool  # noqa: E402
from lrviz.records import Event, StepBuffer, ValPoint  # noqa: E402
from lrviz.store.runs import RunStore  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent
WARMUP_STEPS = 500
BIG = 10**9


def pct(values: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


def run_loop(seconds: float) -> None:
    loop = QEventLoop()
    QTimer.singleShot(int(seconds * 1000), loop.quit)
    loop.exec()


def wait_for(cond, timeout: float = 120.0) -> None:  # noqa: ANN001
    """Run the event loop until ``cond()``."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError("the benchmark waited too long")
        run_loop(0.02)


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

    def start(self) -> None:
        self._clock.start()
        self._last = self._clock.nsecsElapsed()
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()

    def _on_beat(self) -> None:
        now = self._clock.nsecsElapsed()
        self.lateness.append(max(0.0, (now - self._last) / 1e6 - self.interval))
        self._last = now


class PaintLog:
    """When each paint of the plots ended (monotonic clock) and the newest step it showed.

    Installed before the window is made (PySide binds a widget's overrides when it is created)."""

    def __init__(self) -> None:
        self.window: MainWindow | None = None
        self.paints: list[tuple[float, int]] = []
        self.on = False
        original = plots_module._TimedView.paintEvent
        log = self

        def paint(view, event):  # noqa: ANN001, ANN202
            original(view, event)
            primary = log.window.plots.primary if log.window is not None else None
            if log.on and primary is not None and primary.trace.rows:
                log.paints.append((time.perf_counter(), primary.trace.last_step))

        plots_module._TimedView.paintEvent = paint


def steps_per_second(store_path: str, run_id: int) -> float:
    """The run's speed after its warm-up, from its own time column."""
    with RunStore(store_path) as store:
        t = store.load_steps(run_id)["time"]
    if len(t) < WARMUP_STEPS + 100:
        raise RuntimeError(f"run {run_id} took only {len(t)} steps")
    return (len(t) - 1 - WARMUP_STEPS) / float(t[-1] - t[WARMUP_STEPS])


def store_steps(store_path: str, run_id: int | None) -> int:
    if run_id is None:
        return 0
    with RunStore(store_path) as store:
        return store.get_run(run_id).steps or 0


def headless_block(store_path: str, seconds: float, env: dict[str, str]) -> float:
    """``lrviz run`` with nobody attached; stopped with Ctrl+C (SIGINT) after ``seconds``."""
    before = {r.id for r in RunStore(store_path).list_runs()}
    proc = subprocess.Popen([sys.executable, "-m", "lrviz", "run", str(HERE / "tiny_mlp.py"), "--steps", str(BIG),
                             "--store", store_path, "--quiet"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_id = None
    end = time.monotonic() + 120
    while run_id is None or store_steps(store_path, run_id) < WARMUP_STEPS:
        if time.monotonic() > end or proc.poll() is not None:
            raise RuntimeError("the headless run did not start")
        time.sleep(0.05)
        new = [r.id for r in RunStore(store_path).list_runs() if r.id not in before]
        run_id = new[0] if new else None
    time.sleep(seconds)
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    return steps_per_second(store_path, run_id)


def window_block(window: MainWindow, seconds: float, script: str, beat: Heartbeat | None = None,
                 paints: PaintLog | None = None) -> tuple[float, object]:
    """A run started from the window (in its own process), followed and drawn for ``seconds``."""
    info = window.script_info
    assert info is not None and info.path.name == script
    cfg = RunConfig(**info.defaults).merged({"steps": BIG})
    run = window.start_run(window.run_spec(cfg))
    wait_for(lambda: run.step >= WARMUP_STEPS and store_steps(window.store_path, run.run_id) >= WARMUP_STEPS)
    if beat is not None:
        beat.start()
    if paints is not None:
        paints.on = True
    run_loop(seconds)
    if beat is not None:
        beat.stop()
    if paints is not None:
        paints.on = False
    window.runs.stop()
    wait_for(lambda: run.done.is_set() and not window.is_active())
    return steps_per_second(window.store_path, run.run_id), run


def load(window: MainWindow, script: Path) -> None:
    window.load_script(str(script))
    wait_for(lambda: window.script_info is not None and window.script_info.path == script.resolve())


def throughput(window: MainWindow, rounds: int, block: float, env: dict[str, str]) -> dict[str, object]:
    load(window, HERE / "tiny_mlp.py")
    beat = Heartbeat()
    rates: dict[str, list[float]] = {"headless": [], "gui": [], "gui+beat": []}
    frames = 0
    kinds = ["headless", "gui", "gui+beat"]
    for i in range(rounds):
        for kind in (kinds if i % 2 == 0 else kinds[::-1]):  # neither always goes first
            if kind == "headless":
                rates[kind].append(headless_block(window.store_path, block, env))
                continue
            before = window.plots.redraws
            rate, _ = window_block(window, block, "tiny_mlp.py", beat if kind == "gui+beat" else None)
            rates[kind].append(rate)
            if kind == "gui":
                frames += window.plots.redraws - before
    late = beat.lateness
    head = statistics.mean(rates["headless"])
    return {**rates, "ratio": statistics.mean(rates["gui"]) / head,
            "ratios": [g / h for g, h in zip(rates["gui"], rates["headless"])],
            "ratio_beat": statistics.mean(rates["gui+beat"]) / head,
            "p50": pct(late, 50), "p99": pct(late, 99), "max": max(late) if late else float("nan"),
            "beats": len(late), "frames_per_s": frames / (rounds * block)}


def latency(window: MainWindow, paints: PaintLog, rounds: int, block: float) -> dict[str, float]:
    load(window, HERE / "tiny_mlp_clock.py")
    out: list[np.ndarray] = []
    for _ in range(rounds):
        paints.paints = []
        _, run = window_block(window, block, "tiny_mlp_clock.py", paints=paints)
        steps = np.asarray(run.probe_steps)
        clock = np.asarray(run.probe_values["clock"])
        v = run.buffer.view()
        ends_rel = v["time"][steps - v["step"][0]]
        offset = float(np.min(clock - ends_rel))  # the run's time origin on this machine's monotonic clock
        p_time = np.array([t for t, _ in paints.paints])
        p_step = np.maximum.accumulate(np.array([s for _, s in paints.paints]))
        first, last = int(p_step[0]) + 1, int(p_step[-1])  # steps finished while we watched
        s = np.arange(first, last + 1)
        shown_at = p_time[np.searchsorted(p_step, s)]
        ends = offset + v["time"][s - v["step"][0]]
        out.append((shown_at - ends) * 1e3)
    lat = np.concatenate(out)
    return {"p50": pct(lat, 50), "p95": pct(lat, 95), "max": float(lat.max()), "n": len(lat),
            "per_block_p95": [pct(x, 95) for x in out]}


def synthetic_buffer(n: int, rng: np.random.Generator) -> StepBuffer:
    steps = np.arange(n)
    loss = 2.0 * np.exp(-steps / max(1, n / 5)) + 0.05 + 0.02 * rng.standard_normal(n)
    loss[rng.integers(0, n, 20)] += 5.0  # one-step spikes
    cols = {"epoch": (steps // 1000).astype(np.int32), "time": steps * 1e-4, "loss": loss,
            "grad_norm": np.abs(1 + 0.3 * rng.standard_normal(n)).astype(np.float32), "lr": np.full((n, 1), 0.01)}
    return StepBuffer.from_columns(cols)


def redraw_cost(app, window: MainWindow, n: int, frames: int = 60, per_frame: int = 300) -> dict[str, float]:  # noqa: ANN001
    rng = np.random.default_rng(0)
    buf = synthetic_buffer(n, rng)
    events = [Event(int(n * f), "set_lr", {"lr": 0.01}) for f in (0.2, 0.5, 0.8)]
    val = [ValPoint(int(s), 0, 0.1, 0.9) for s in np.linspace(0, n - 1, 200)]
    t = time.perf_counter()
    plots = window.plots
    plots.set_primary(RunTrace(buf, events, val, label="bench", live=True, smoothing=plots.smoothing))
    plots.refresh(force=True)
    load_s = time.perf_counter() - t
    new = rng.standard_normal(per_frame) * 0.02 + 0.06
    times, fold, paint = [], [], []
    for k in range(frames + 5):  # 5 to warm up (and let the buffer grow once)
        for v in new:  # the run's appends: not the GUI thread's cost
            buf.append(0, 0.0, float(v), 1.0, [0.01])
        t0 = time.perf_counter()
        plots.refresh(force=True)
        t1 = time.perf_counter()
        plots.view.viewport().repaint()  # paint now, synchronously
        t2 = time.perf_counter()
        if k >= 5:
            times.append((t2 - t0) * 1e3)
            fold.append((t1 - t0) * 1e3)
            paint.append((t2 - t1) * 1e3)
        app.processEvents()
    vb = plots.plots["loss"].getViewBox()
    zoom = []
    for k in range(20):  # zoomed in on a tenth of the history, panning: the decimation follows the view
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
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-redraw", action="store_true")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    app = create_app()
    pool = WorkerPool(env=env, log_dir=_TMP)
    paints = PaintLog()
    window = MainWindow(str(Path(_TMP) / "store"), pool=pool)
    paints.window = window
    window.resize(1280, 800)
    window.show()
    run_loop(0.5)
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"lrviz UI responsiveness — Qt platform {app.platformName()}, {os.cpu_count()} CPUs, load average "
          f"{load_avg:.1f}, training processes on {args.threads} torch thread(s), plot area "
          f"{window.plots.view.width()}x{window.plots.view.height()} px")

    if not args.skip_throughput:
        r = throughput(window, args.rounds, args.block, env)
        print(f"\nThe tiny MLP at full speed in its own process ({args.rounds} x {args.block:g} s blocks each, "
              "interleaved):")
        for kind, text in (("headless", "headless (lrviz run)"), ("gui", "window attached"),
                           ("gui+beat", "+ 5 ms heartbeat")):
            vals = r[kind]
            print(f"  {text:22s} {statistics.median(vals):8.0f} steps/s  (blocks: "
                  f"{', '.join(f'{x:.0f}' for x in vals)})")
        print(f"  throughput ratio       {r['ratio']:8.3f}          (goal >= 0.97; per pair: "
              f"{', '.join(f'{x:.2f}' for x in r['ratios'])}; with the heartbeat {r['ratio_beat']:.3f})")
        print(f"  redraws                {r['frames_per_s']:8.1f} /s")
        print(f"  heartbeat lateness     p50 {r['p50']:.2f} ms   p99 {r['p99']:.2f} ms   max {r['max']:.2f} ms  "
              f"({r['beats']} beats; goals p99 <= 16, max <= 50)")
        lat = latency(window, paints, max(2, args.rounds // 2), args.block)
        print(f"  step to screen         p50 {lat['p50']:.1f} ms   p95 {lat['p95']:.1f} ms   max {lat['max']:.1f} ms  "
              f"({lat['n']:,} steps; per block p95 {', '.join(f'{x:.0f}' for x in lat['per_block_p95'])}; "
              "goal p95 <= 100)")

    if not args.skip_redraw:
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
    print(f"\ntorch imported by the app process: {'torch' in sys.modules}")
    window.shutdown(30)
    window.close()
    pool.close()
    sys.stdout.flush()
    # PySide6 6.12 can crash while tearing down pyqtgraph's scene at interpreter exit; the figures
    # are printed, so leave without running Qt's destructors.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
