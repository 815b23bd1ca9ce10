"""Live endpoint overhead: the engine's step cost with its endpoint serving one attached client,
against the same engine with no endpoint. Blocks of each are interleaved in one process so machine
noise hits both alike. Both train in the engine's own thread; the client is a real RemoteRun in another
process (as the app is), attached over the Unix socket and receiving every chunk.

Goal: the endpoint adds <= 1% to the headless engine's step cost with one client attached.

    .venv/bin/python bench/live_overhead.py [--rounds 8] [--steps 4000]
    .venv/bin/python bench/live_overhead.py --alternate [--rounds 30] [--steps 2000]

The first mode compares separate engine runs, whose noise between runs (+-10 %) dwarfs 1 %.
``--alternate`` resolves it within ONE served engine run: ``--rounds`` pairs of blocks of
``--steps`` steps, one block with a client attached (a RemoteRun in another process that attaches
from the current row and detaches at the block's end), one with none, in ABBA order; each block's
speed from the run's own time column; the median and quartiles of the per-pair ratios. It also
reports the endpoint threads' own CPU per step (each thread's CPU clock, read from outside it):
a direct, low-noise figure of what the endpoint takes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lrviz.config import RunConfig
from lrviz.engine import TrainingEngine
from lrviz.experiment import load_experiment
from lrviz.live.serve import serving
from lrviz.store.runs import RunStore

HERE = Path(__file__).parent


CLIENT = """
import json, sys
from lrviz.live.connection import ConnectionInfo
from lrviz.live.run import RemoteRun
r = RemoteRun(ConnectionInfo.from_dict(json.loads(sys.argv[1])), name="bench").connect()
r.resume().result(60)
r.done.wait(600)
print(len(r.buffer))
"""


def run_once(exp, steps: int, store: RunStore, live: bool) -> tuple[float, float]:
    """Seconds per step of one engine run in its own thread, from its first to its last step, and
    the CPU seconds per step of this whole process (the engine, its store writer and, when live,
    the endpoint's threads) over the run.

    ``live``: served, with a client in another process (as the app is) attached from the start.
    """
    cpu0 = time.process_time()
    eng = TrainingEngine(exp, RunConfig(**exp.defaults).merged({"steps": steps, "epochs": None}), store,
                         start_paused=True)
    with serving(eng, store) if live else contextlib.nullcontext() as ep:
        eng.start()
        if live:
            proc = subprocess.Popen([sys.executable, "-c", CLIENT, json.dumps(ep.info.to_dict())],
                                    stdout=subprocess.PIPE, text=True)
        else:
            eng.resume()
        eng.join()
        if live:
            got = int(proc.communicate(timeout=600)[0].strip() or 0)
            assert got == steps, (got, steps)
    assert eng.state == "finished", eng.error
    cpu = time.process_time() - cpu0
    t = eng.buffer.view()["time"]
    return float(t[-1] - t[0]) / (len(t) - 1), cpu / steps


#: The client of --alternate: one process for the whole run (starting a Python process per block
#: would disturb the block after it); stdin says when to attach (from which row) and detach.
TOGGLING_CLIENT = """
import json, sys
from lrviz.live.connection import ConnectionInfo
from lrviz.live.run import RemoteRun
info = ConnectionInfo.from_dict(json.loads(sys.argv[1]))
run = None
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "attach":
        kw = {"since_row": int(cmd[1])}
        try:
            run = RemoteRun(info, name="bench", **kw).connect()
        except TypeError:  # an endpoint from before since_row reached RemoteRun: the whole history
            run = RemoteRun(info, name="bench").connect()
        print("attached", flush=True)
    elif cmd[0] == "detach":
        n = len(run.buffer) if run.buffer is not None else 0
        run.close()
        print("detached", n, flush=True)
    else:
        break
"""


def _endpoint_cpu() -> dict[int, float]:
    """CPU seconds of each of the endpoint's threads so far (each thread's own CPU clock)."""
    import threading

    out = {}
    for t in threading.enumerate():
        if t.name.startswith("lrviz-live") and t.ident is not None:
            try:
                out[t.ident] = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
            except OSError:  # it ended just now
                pass
    return out


def _cpu_between(a: dict[int, float], b: dict[int, float]) -> float:
    """CPU the threads alive at both readings took between them."""
    return sum(b[k] - a[k] for k in a.keys() & b.keys())


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far, from /proc (0 where there is none)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def alternate(exp, rounds: int, block: int) -> None:
    """Blocks with and without a client in one served engine run (see the module's docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp) / "runs.sqlite")
        eng = TrainingEngine(exp, RunConfig(**exp.defaults).merged({"steps": 10**8, "epochs": None}), store)
        with serving(eng, store) as ep:
            eng.start()
            proc = subprocess.Popen([sys.executable, "-c", TOGGLING_CLIENT, json.dumps(ep.info.to_dict())],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

            def say(line: str) -> str:
                proc.stdin.write(line + "\n")
                proc.stdin.flush()
                return proc.stdout.readline().strip()

            client_cpu: list[tuple[float, int, bool]] = []
            while eng.buffer is None or len(eng.buffer) < 64:  # prepared, training
                time.sleep(0.01)

            def measure(attached: bool) -> tuple[float, float, float]:
                if attached:
                    assert say(f"attach {len(eng.buffer)}") == "attached"
                cpu0, ecpu0, r0 = time.process_time(), _endpoint_cpu(), len(eng.buffer)
                ccpu0 = _process_cpu(proc.pid)
                while len(eng.buffer) < r0 + block:
                    time.sleep(0.02)
                cpu1, ecpu1, r1 = time.process_time(), _endpoint_cpu(), len(eng.buffer)
                client_cpu.append((_process_cpu(proc.pid) - ccpu0, r1 - r0, attached))
                if attached:
                    reply = say("detach").split()
                    assert reply[0] == "detached" and int(reply[1]) > 0, reply
                t = eng.buffer.view(r0 - 1, r1)["time"]
                steps = r1 - r0
                return float(t[-1] - t[0]) / steps, (cpu1 - cpu0) / steps, _cpu_between(ecpu0, ecpu1) / steps

            measure(True)  # warm up both
            ring = getattr(ep, "_ring", None)
            if ring is not None:
                ring.timings = []
            measure(False)
            pairs, cpu_pairs, ep_cpu, ep_idle = [], [], [], []
            for i in range(rounds):
                order = (True, False) if i % 2 == 0 else (False, True)
                got = {a: measure(a) for a in order}
                pairs.append(got[True][0] / got[False][0])
                cpu_pairs.append(got[True][1] / got[False][1])
                ep_cpu.append(got[True][2])
                ep_idle.append(got[False][2])
                step_us = got[False][0] * 1e6
            say("quit")
            proc.wait(60)
            eng.stop()
            eng.join()
        store.close()
    lo, med, hi = _quartiles(pairs)
    clo, cmed, chi = _quartiles(cpu_pairs)
    e_lo, e_med, e_hi = _quartiles([x * 1e6 for x in ep_cpu])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, python {sys.version.split()[0]}, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"one engine run, {rounds} pairs of {block}-step blocks (client attached / none), ~{step_us:.0f} us/step")
    print(f"time ratio attached/none per pair: median {med:.4f} (quartiles {lo:.4f}-{hi:.4f}; "
          f"min {min(pairs):.3f}, max {max(pairs):.3f})  goal <= 1.01")
    print(f"process CPU ratio per pair: median {cmed:.4f} (quartiles {clo:.4f}-{chi:.4f})")
    print(f"endpoint threads' CPU per step: {e_med:.2f} us attached (quartiles {e_lo:.2f}-{e_hi:.2f}), "
          f"{statistics.median(ep_idle) * 1e6:.2f} us with no client; "
          f"{e_med / step_us * 100:.2f} % of a step attached")
    for attached in (True, False):
        sec = sum(c for c, _, a in client_cpu[2:] if a == attached)
        steps = sum(n for _, n, a in client_cpu[2:] if a == attached)
        print(f"the client's process (another process, competing for this machine's cores), "
              f"{'attached' if attached else 'detached'}: {sec / steps * 1e6:.2f} us CPU per step of the run")
    if ring is not None and ring.timings:
        per_block = ring.rows / ring.writes
        med = statistics.median(ring.timings)
        print(f"ring copy in the training thread: median {med / per_block * 1e6:.3f} us a step "
              f"({med * 1e6:.1f} us per block of {per_block:.0f} rows; mean {ring.write_s / ring.rows * 1e6:.3f} "
              f"us a step, with the times the thread was preempted mid-copy)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alternate", action="store_true", help="blocks with and without a client in one run")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--steps", type=int)
    args = ap.parse_args()
    torch.set_num_threads(1)
    exp = load_experiment(HERE / "tiny_mlp.py")
    if args.alternate:
        alternate(exp, args.rounds or 30, args.steps or 2000)
        return
    args.rounds, args.steps = args.rounds or 8, args.steps or 4000
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp) / "runs.sqlite")
        run_once(exp, 500, store, False)
        run_once(exp, 500, store, True)
        plain, live, plain_cpu, live_cpu = [], [], [], []
        for i in range(args.rounds):
            order = (False, True) if i % 2 == 0 else (True, False)
            for lv in order:
                wall, cpu = run_once(exp, args.steps, store, lv)
                (live if lv else plain).append(wall)
                (live_cpu if lv else plain_cpu).append(cpu)
        store.close()
    ratios = [lv / p for p, lv in zip(plain, live)]
    cpu_ratios = [lv / p for p, lv in zip(plain_cpu, live_cpu)]
    p, lv = statistics.median(plain), statistics.median(live)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, python {sys.version.split()[0]}")
    print(f"engine, no endpoint       : {1 / p:8.0f} steps/s ({p * 1e6:.1f} us/step, median of {args.rounds})")
    print(f"engine, endpoint + client : {1 / lv:8.0f} steps/s ({lv * 1e6:.1f} us/step)")
    print(f"time ratio live/plain: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}; rounds: {', '.join(f'{r:.3f}' for r in ratios)})"
          "  goal <= 1.01")
    print(f"CPU of the training process per step: {statistics.median(plain_cpu) * 1e6:.1f} us plain, "
          f"{statistics.median(live_cpu) * 1e6:.1f} us live; ratio median {statistics.median(cpu_ratios):.3f} "
          f"(min {min(cpu_ratios):.3f}, max {max(cpu_ratios):.3f}): what the endpoint's threads take from it")


if __name__ == "__main__":
    main()
