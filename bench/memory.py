"""Memory per retained step: in the training process, and in the app following it.

* **Training process** (``--train``): ``lrviz run`` of a one-weight model (the cheapest step there
  is, so a long history builds fast; ``--script`` another), recording into a store and serving live,
  in a child process. A thread in it writes every half second the steps recorded, the RSS and what
  holds memory by its own accounting: the step buffer (sealed chunks and the raw ones being
  written), SQLite (``sqlite3_memory_used``: its page cache fills to its cap, 2 MiB a connection, in
  the first few hundred thousand steps), the C heap in use (``mallinfo2``), Python's allocated
  blocks and the events. Reports each one's least-squares slope against the steps after the first
  fifth (the warm-up: imports, the first chunks, the caches filling), and over the two halves of
  that (a slope still rising would show there), with the run's time and the load average.
* **App** (default): what the app keeps for a run it follows: a RemoteRun's step buffer (history
  sealed in chunks by the reader thread) and the plots' RunTrace (min/max pyramids, the smoothed
  loss recomputed on demand). Rows arrive in 4096-row blocks as from the endpoint. Reports the bytes
  the structures hold per step (their own accounting) and the process's RSS growth per step, and
  the time to answer one redraw query at the end.

Goal (issue 9): <= 24 bytes per retained step in both; 1e7 steps still drawable.

    .venv/bin/python bench/memory.py [--steps 10000000]          # the app side
    .venv/bin/python bench/memory.py --train [--steps 1000000] [--script bench/tiny_mlp.py] [--arena-max 1]
"""

from __future__ import annotations

import argparse
import gc
import json
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


#: The training process: ``lrviz run`` with a thread that writes, every ``every`` seconds, a JSON line of
#: the steps recorded, the RSS and what holds memory by its own accounting (argv: out file, every, lrviz's).
TRAIN = r"""
import ctypes, json, os, sys, threading, time
import lrviz.engine

engines = []
_init = lrviz.engine.TrainingEngine.__init__
def _keep(self, *a, **k):
    engines.append(self)
    _init(self, *a, **k)
lrviz.engine.TrainingEngine.__init__ = _keep

class MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
import _sqlite3
sqlite_used = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used  # the library _sqlite3 is linked against
sqlite_used.restype = ctypes.c_int64
out, every = open(sys.argv[1], "w"), float(sys.argv[2])

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def sample():
    while True:
        time.sleep(every)
        buf = engines[0].buffer if engines else None
        if buf is None:
            continue
        m = libc.mallinfo2()
        out.write(json.dumps({"steps": buf.n, "rss": rss(), "buffer": buf.nbytes, "sqlite": sqlite_used(),
                              "malloc": m.uordblks + m.hblkhd, "events": len(engines[0].events),
                              "pyblocks": sys.getallocatedblocks()}) + "\n")
        out.flush()

threading.Thread(target=sample, daemon=True).start()
from lrviz.cli import main
sys.exit(main(sys.argv[3:]))
"""

#: What the training process's samples hold: (key, what it is).
TRAIN_PARTS = (("rss", "process RSS"), ("buffer", "step buffer (its nbytes)"),
               ("sqlite", "SQLite (sqlite3_memory_used)"), ("malloc", "C heap in use (mallinfo2)"),
               ("pyblocks", "Python objects (allocated blocks)"), ("events", "events"))


def train_side(steps: int, script: Path, arena_max: int | None) -> None:
    """One ``lrviz run`` (store, live endpoint); slopes against the steps recorded after the first fifth."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if arena_max:
        env["MALLOC_ARENA_MAX"] = str(arena_max)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "samples.jsonl"
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", TRAIN, str(log), "0.5", "run", str(script), "--steps", str(steps),
                            "--quiet", "--store", str(Path(tmp) / "store.sqlite")], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        took = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"lrviz run failed: {p.stderr[-2000:]}")
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    load = os.getloadavg()
    late = [r for r in rows if r["steps"] >= steps / 5]
    if len(late) < 8:
        raise SystemExit(f"too few samples after the first fifth ({len(late)}): run more steps")
    n = np.array([r["steps"] for r in late], np.float64)
    halves = np.array_split(np.arange(len(late)), 2)
    print(f"training process (lrviz run of {script.name}, store and live endpoint"
          f"{f', MALLOC_ARENA_MAX={arena_max}' if arena_max else ''}), {steps:,} steps in {took:.0f} s "
          f"({steps / took:,.0f} steps/s), load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; "
          f"{len(rows)} samples, slopes after the first fifth (and over its two halves):")
    for key, what in TRAIN_PARTS:
        y = np.array([r[key] for r in late], np.float64)
        slope = np.polyfit(n, y, 1)[0]
        per_half = ", ".join(f"{np.polyfit(n[h], y[h], 1)[0]:.1f}" for h in halves)
        unit = "per step" if key in ("pyblocks", "events") else "bytes/step"
        print(f"  {what:36s} {slope:6.2f} {unit:10s} (halves {per_half})   at the end {late[-1][key]:,}"
              + ("   goal <= 24" if key == "rss" else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true", help="measure the training process instead of the app")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--script", type=Path, default=HERE / "one_weight.py",
                    help="the training script of --train (default: the one-weight model)")
    ap.add_argument("--arena-max", type=int, default=None, help="--train with MALLOC_ARENA_MAX set to this")
    args = ap.parse_args()
    if args.train:
        train_side(args.steps or 1_000_000, args.script, args.arena_max)
    else:
        app_side(args.steps or 10_000_000)


if __name__ == "__main__":
    main()
