"""Live endpoint overhead: the engine's step cost with its endpoint serving one attached client,
against the same engine with no endpoint. Blocks of each are interleaved in one process so machine
noise hits both alike. Both train in the engine's own thread; the client is a real RemoteRun in another
process (as the app is), attached over the Unix socket and receiving every chunk.

Goal: the endpoint adds <= 1% to the headless engine's step cost with one client attached.

    .venv/bin/python bench/live_overhead.py [--rounds 8] [--steps 4000]
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _args import rounds_and_steps

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


def main() -> None:
    args = rounds_and_steps(__doc__, rounds=8, steps=4000)
    exp = load_experiment(HERE / "tiny_mlp.py")
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
