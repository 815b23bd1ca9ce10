"""Engine overhead: the same tiny MLP trained by a bare PyTorch loop and by the lrviz engine.

The engine runs headless and records everything (per-step loss, LR, grad norm, epoch, time; the
store writer persisting in batches). Blocks of each are interleaved in one process so machine noise
hits both alike. Prints the throughput ratio (goal <= 1.02: at most 2% slower), the bytes each
stored step takes on disk, and the store's write rate.

    .venv/bin/python bench/engine_overhead.py [--rounds 6] [--steps 3000]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _args import rounds_and_steps

from lrviz.config import RunConfig
from lrviz.engine import TrainingEngine, seed_everything
from lrviz.experiment import load_experiment
from lrviz.store.runs import RunStore

HERE = Path(__file__).parent


def bare_loop(exp, steps: int) -> float:
    """Seconds per step of a plain loop: zero_grad, forward, loss, backward, step, loss.item()."""
    seed_everything(0)
    model = exp.make_model()
    data, _ = exp.make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = exp.module.loss_fn
    done = 0
    t = time.perf_counter()
    while done < steps:
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            loss.item()
            done += 1
            if done == steps:
                break
    return (time.perf_counter() - t) / steps


def engine_run(exp, steps: int, store: RunStore) -> float:
    """Seconds per step of the engine (from its own first to last step), recording into the store."""
    eng = TrainingEngine(exp, RunConfig(**exp.defaults).merged({"steps": steps, "epochs": None}), store)
    eng.run()
    assert eng.state == "finished", eng.error
    t = eng.buffer.view()["time"]
    return float(t[-1]) / len(t)


def store_write_rate(path: Path, steps: int = 1_000_000, chunk: int = 1000) -> float:
    """Steps per second appended to a store in ~0.5 s flush-sized chunks."""
    with RunStore(path) as s:
        rid = s.create_run(script_path="bench", script_hash="0", config={}, device="cpu")
        rng = np.random.default_rng(0)
        t = time.perf_counter()
        for start in range(0, steps, chunk):
            cols = {
                "epoch": np.full(chunk, start // 5000, np.int32),
                "time": (start + np.arange(chunk)) / 2000.0,
                "loss": np.abs(rng.normal(1, 0.1, chunk)).astype(np.float32).astype(np.float64),
                "grad_norm": rng.random(chunk).astype(np.float32),
                "lr": np.full((chunk, 1), 0.01),
            }
            with s.batch():
                s.append_steps(rid, start, cols)
                s.heartbeat(rid)
        return steps / (time.perf_counter() - t)


def main() -> None:
    args = rounds_and_steps(__doc__, rounds=6, steps=3000)
    exp = load_experiment(HERE / "tiny_mlp.py")
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp) / "runs.sqlite")
        bare_loop(exp, 500)  # warm up both paths
        engine_run(exp, 500, store)
        bare, eng = [], []
        for _ in range(args.rounds):
            bare.append(bare_loop(exp, args.steps))
            eng.append(engine_run(exp, args.steps, store))
        store.close()
        # bytes per step on disk, after folding the WAL into the database
        import sqlite3

        with sqlite3.connect(Path(tmp) / "runs.sqlite") as c:
            c.execute("pragma wal_checkpoint(TRUNCATE)")
            c.execute("vacuum")
        total_steps = 500 + args.rounds * args.steps
        size = os.path.getsize(Path(tmp) / "runs.sqlite")
        rate = store_write_rate(Path(tmp) / "rate.sqlite")
    b, e = statistics.median(bare), statistics.median(eng)
    ratios = [ei / bi for bi, ei in zip(bare, eng)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, python {sys.version.split()[0]}")
    print(f"bare loop      : {1 / b:8.0f} steps/s  ({b * 1e6:.1f} us/step, median of {args.rounds})")
    print(f"lrviz engine   : {1 / e:8.0f} steps/s  ({e * 1e6:.1f} us/step)")
    print(f"time ratio engine/bare: median {statistics.median(ratios):.3f} "
          f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)})  goal <= 1.02")
    print(f"store          : {size / total_steps:.1f} bytes/step on disk ({total_steps} steps, "
          f"{size} bytes incl. run rows and schema)")
    print(f"store writes   : {rate:,.0f} steps/s appended (1000-step chunks, one transaction each)")


if __name__ == "__main__":
    main()
