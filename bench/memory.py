"""Memory per retained step: in the training process, and in the app following it.

* **Training process** (``--train``, a child process per size): ``lrviz run`` of a one-weight model
  (the cheapest step there is, so a long history builds fast), recording into a store and serving
  live. Reports RSS growth between a short run and a long one, per extra step.
* **App** (default): what the app keeps for a run it follows: a RemoteRun's step buffer (history
  sealed in chunks by the reader thread) and the plots' RunTrace (min/max pyramids, the smoothed
  loss recomputed on demand). Rows arrive in 4096-row blocks as from the endpoint. Reports the bytes
  the structures hold per step (their own accounting) and the process's RSS growth per step, and
  the time to answer one redraw query at the end.

Goal (issue 9): <= 24 bytes per retained step in both; 1e7 steps still drawable.

    .venv/bin/python bench/memory.py [--steps 10000000]          # the app side
    .venv/bin/python bench/memory.py --train [--steps 1000000]   # the training process
    .venv/bin/python bench/memory.py --slope [--steps 1000000]   # its RSS over one run, twice

``--slope``: ``lrviz run`` of ``--steps`` steps, twice side by side, their RSS sampled every half second against the
steps it has stored; the figure is the least-squares slope after the first fifth of the run (the
warm-up: imports, the first chunks, the allocator's first arenas), one as is and one with
``MALLOC_ARENA_MAX=1`` (glibc's per-thread malloc arenas are what the store writer's and the live
endpoint's threads grow through).
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def app_side(steps: int) -> None:
    from lrviz.ui.trace import RunTrace

    from lrviz.records import CHUNK_ROWS, StepBuffer

    rng = np.random.default_rng(0)
    gc.collect()
    before = rss()
    buf = StepBuffer(groups=1)
    trace = RunTrace(buf)
    t, loss = 0.0, 2.0
    for start in range(0, steps, CHUNK_ROWS):
        k = min(CHUNK_ROWS, steps - start)
        dt = 3.2e-4 * (1 + 0.05 * rng.standard_normal(k))
        times = t + np.cumsum(dt)
        t = float(times[-1])
        losses = loss * np.exp(-np.arange(k) / 2e6) * (1 + 0.1 * rng.standard_normal(k))
        loss = float(losses[-1])
        buf.extend({"epoch": np.full(k, start // 50_000, np.int32), "time": times, "loss": losses,
                    "grad_norm": np.abs(rng.normal(1, 0.2, k)).astype(np.float32),
                    "lr": np.full((k, 1), 0.01 if start < steps // 2 else 0.001)})
        buf.seal()  # the reader thread does this after each block
        if (start // CHUNK_ROWS) % 8 == 0:
            trace.update()  # the redraw timer folds in new rows
    trace.update()
    gc.collect()
    grown = rss() - before
    t0 = time.perf_counter()
    for _ in range(20):
        for name in ("loss", "loss_smooth", "grad_norm", "lr0"):
            trace.query(name, 0, steps, 1200)
    q_all = (time.perf_counter() - t0) / 20
    t0 = time.perf_counter()
    for _ in range(20):
        for name in ("loss", "loss_smooth", "grad_norm", "lr0"):
            trace.query(name, steps // 2, steps // 2 + 1000, 1200)
    q_zoom = (time.perf_counter() - t0) / 20
    print(f"app, {steps:,} steps followed:")
    print(f"  step buffer: {buf.nbytes / steps:5.1f} bytes/step   plot pyramids: {trace.nbytes / steps:5.1f} "
          f"bytes/step   together: {(buf.nbytes + trace.nbytes) / steps:5.1f} bytes/step   (goal <= 24)")
    print(f"  process RSS growth: {grown / steps:5.1f} bytes/step")
    print(f"  one redraw's queries (4 series): whole history {q_all * 1e3:.2f} ms, zoomed to 1000 steps "
          f"{q_zoom * 1e3:.2f} ms")


TRAIN = """
import os, sys
from lrviz.cli import main
status = main(sys.argv[1:])
with open("/proc/self/statm") as f:
    print("RSS", int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"), flush=True)
sys.exit(status)
"""


def train_side(steps: int) -> None:
    script = HERE / "one_weight.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (steps // 10, steps):
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", TRAIN, "run", str(script), "--steps", str(n), "--quiet",
                                "--store", str(Path(tmp) / f"s{n}")], capture_output=True, text=True, env=env)
            line = [x for x in p.stdout.splitlines() if x.startswith("RSS")]
            if p.returncode != 0 or not line:
                raise SystemExit(f"lrviz run failed: {p.stderr[-2000:]}")
            out[n] = int(line[0].split()[1])
            print(f"  {n:,} steps: RSS {out[n] / 2**20:.1f} MiB at the end ({time.perf_counter() - t:.0f} s)")
    small, big = steps // 10, steps
    print(f"training process (lrviz run, store and live endpoint): RSS growth "
          f"{(out[big] - out[small]) / (big - small):.1f} bytes per extra step (goal <= 24)")


def slope_side(steps: int) -> None:
    """Both configurations side by side (the same machine conditions), RSS against steps stored."""
    from lrviz.store.runs import RunStore

    script = HERE / "one_weight.py"
    configs = (("as is", {}), ("MALLOC_ARENA_MAX=1", {"MALLOC_ARENA_MAX": "1"}))
    with tempfile.TemporaryDirectory() as tmp:
        procs, samples = [], []
        for k, (_, extra) in enumerate(configs):
            env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
            procs.append(subprocess.Popen([sys.executable, "-m", "lrviz", "run", str(script), "--steps", str(steps),
                                           "--quiet", "--store", str(Path(tmp) / f"s{k}.sqlite")], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            samples.append([])  # (steps stored, RSS bytes)
        t0 = time.perf_counter()
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
            for k, p in enumerate(procs):
                if p.poll() is not None:
                    continue
                try:
                    with open(f"/proc/{p.pid}/statm") as f:
                        r = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                    with RunStore(Path(tmp) / f"s{k}.sqlite") as st:
                        runs = st.list_runs()
                        n = (runs[0].steps or 0) if runs else 0
                except Exception:  # noqa: BLE001 - the run ending under us, the store busy
                    continue
                if n:
                    samples[k].append((n, r))
        for p in procs:
            if p.returncode != 0:
                raise SystemExit(f"lrviz run failed: {p.stderr.read()[-2000:]}")
    print(f"training process (lrviz run of bench/one_weight.py, store and live endpoint), {steps:,} steps, "
          f"{time.perf_counter() - t0:.0f} s, both side by side:")
    for (label, _), rows in zip(configs, samples):
        s = np.array(rows, dtype=np.float64)
        late = s[s[:, 0] >= steps / 5]
        slope = np.polyfit(late[:, 0], late[:, 1], 1)[0] if len(late) > 3 else float("nan")
        per_half = [np.polyfit(h[:, 0], h[:, 1], 1)[0] for h in np.array_split(late, 2) if len(h) > 3]
        print(f"  {label:20s} RSS {s[0, 1] / 2**20:.1f} -> {s[-1, 1] / 2**20:.1f} MiB ({len(s)} samples); slope "
              f"after the first fifth {slope:.1f} bytes/step (halves: {', '.join(f'{x:.1f}' for x in per_half)}; "
              f"goal <= 24)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true", help="measure the training process instead of the app")
    ap.add_argument("--slope", action="store_true", help="the training process's RSS slope over one run")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    if args.slope:
        slope_side(args.steps or 1_000_000)
    elif args.train:
        train_side(args.steps or 1_000_000)
    else:
        app_side(args.steps or 10_000_000)


if __name__ == "__main__":
    main()
