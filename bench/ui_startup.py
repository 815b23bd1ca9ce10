"""How soon is the window on screen after ``lrviz`` starts?

    xvfb-run -a -s "-screen 0 1280x800x24" .venv/bin/python bench/ui_startup.py
    (or QT_QPA_PLATFORM=offscreen .venv/bin/python bench/ui_startup.py)

Starts ``python -m lrviz`` (the app with the default experiment) ``--runs`` times with
``LRVIZ_FIRST_PAINT=1``: the app prints the wall-clock time of its window's first expose, and the
CPU time it had used by then. Reported: wall time from just before the process was started to the
first expose (median and spread), and the CPU time (on an idle machine the wall time is about the
CPU time; on a busy one the wall time is mostly waiting for a core). Goal: <= 1.0 s on an idle
machine. Uses a temporary run store and settings, never the user's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_start(env: dict[str, str], timeout: float) -> tuple[float, float]:
    """(wall seconds from the start of the process to the first expose, CPU seconds by then)."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "lrviz"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        assert proc.stderr is not None
        for line in proc.stderr:
            if "first paint at" in line:
                words = line.split()
                return float(words[4]) - t0, float(words[6])
            if time.monotonic() > deadline:
                break
        raise RuntimeError("the app never reported its first paint")
    finally:
        kids = children(proc.pid)  # its worker (torch loading for the default script): not the next start's load
        proc.kill()
        proc.wait()
        for pid in kids:
            try:
                os.kill(pid, 9)
            except OSError:
                pass


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc; empty elsewhere)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="lrviz-bench-start-")
    env = {**os.environ, "LRVIZ_FIRST_PAINT": "1", "LRVIZ_HOME": str(Path(tmp) / "home"),
           "XDG_CONFIG_HOME": str(Path(tmp) / "config"), "OMP_NUM_THREADS": "1"}
    if sys.platform.startswith("linux") and not env.get("DISPLAY"):
        env.setdefault("QT_QPA_PLATFORM", "offscreen")
    one_start(env, args.timeout)  # warm the file cache: what a second start of the day sees
    walls, cpus = [], []
    for _ in range(args.runs):
        wall, cpu = one_start(env, args.timeout)
        walls.append(wall)
        cpus.append(cpu)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"lrviz start-up: {args.runs} starts, {os.cpu_count()} CPUs, load average {load:.1f}, "
          f"Qt platform {env.get('QT_QPA_PLATFORM') or 'xcb'}")
    print(f"  window visible after  median {statistics.median(walls):.3f} s  (min {min(walls):.3f}, "
          f"max {max(walls):.3f})   goal <= 1.0 s on an idle machine")
    print(f"  CPU time by then      median {statistics.median(cpus):.3f} s  (min {min(cpus):.3f}, "
          f"max {max(cpus):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
