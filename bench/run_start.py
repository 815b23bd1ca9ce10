"""How soon does a second run take its first step, with workers forked from the fork server vs spawned?

    OMP_NUM_THREADS=1 .venv/bin/python bench/run_start.py [--tries 5] [--script regression]

Each try is a fresh process playing the app (it never imports torch): a WorkerPool (forking, or
``fork=False``: spawning ``python -m lrviz worker`` as before the fork server), its warm spare ready
(an app open for a while), then Start: run 1; once it steps, Start again: run 2. Reported per mode,
tries interleaved (fork, spawn, fork, ...): the median wall time from Start to the first step of the
first and of the second run (the second one's worker was started only when run 1 took the spare:
spawned, it is still importing torch), and the CPU the try's processes used in all (the app, its
server and workers: RUSAGE_CHILDREN once everything has been waited for).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRY = r"""
import json, resource, signal, sys, time
from lrviz.config import RunConfig
from lrviz.live.child import WorkerPool

fork, script, store = sys.argv[1] == "fork", sys.argv[2], sys.argv[3]
pool = WorkerPool(log_dir=store, fork=fork)
info = pool.inspect(script).result(300)
spec = {"script": str(info.path), "store": store + "/runs.sqlite",
        "config": RunConfig(**info.defaults).merged({"steps": 10_000_000}).to_dict()}

def first_step(run):
    t0 = time.monotonic()
    while run.step < 1:
        assert not run.done.is_set(), run.error
        run.changed.wait(0.005); run.changed.clear()
    return t0

runs, took = [], []
for _ in range(2):
    t0 = time.monotonic()
    run = pool.start_run(spec)
    first_step(run)
    took.append(time.monotonic() - t0)
    runs.append(run)
assert "torch" not in sys.modules
for run in runs:
    run.stop()
for run in runs:
    run.done.wait(300)
pool.close()
if pool._spare is not None:
    pool._spare.signal(signal.SIGKILL); pool._spare.exited.wait(300)
if pool.server is not None:
    pool.server.proc.wait(300)
for run in runs:
    run.worker.proc.wait(300)
kids, me = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"first": took[0], "second": took[1], "forked": runs[1].worker.proc.__class__.__name__,
                  "cpu": kids.ru_utime + kids.ru_stime + me.ru_utime + me.ru_stime}))
"""


def one_try(mode: str, script: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="lrviz-bench-") as tmp:
        env = {**os.environ, "LRVIZ_HOME": tmp, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        out = subprocess.run([sys.executable, "-c", TRY, mode, script, tmp], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise SystemExit(f"a {mode} try failed:\n{out.stderr[-3000:]}")
        return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tries", type=int, default=5)
    ap.add_argument("--script", default="regression")
    args = ap.parse_args()
    seen: dict[str, list[dict]] = {"fork": [], "spawn": []}
    for i in range(args.tries):
        for mode in ("fork", "spawn") if i % 2 == 0 else ("spawn", "fork"):
            r = one_try(mode, args.script)
            seen[mode].append(r)
            print(f"  {mode:5s} first {r['first']:.3f} s, second {r['second']:.3f} s, CPU {r['cpu']:.2f} s "
                  f"({r['forked']})", flush=True)
    for mode, rs in seen.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("first", "second", "cpu")}
        print(f"{mode:5s}: Start to first step, median of {len(rs)}: first run {med['first']:.3f} s, "
              f"second run {med['second']:.3f} s; CPU of the whole try {med['cpu']:.2f} s")


if __name__ == "__main__":
    main()
