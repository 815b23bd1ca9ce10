"""DDP overhead: the same 2-rank gloo job (a small MLP, DistributedDataParallel, each rank its half of the
batches) as a plain DDP loop, under the lrviz engine (``engine``: what ``torchrun -m lrviz run`` trains,
rank 0 records into a store and the ranks exchange rows and commands at agreed steps; ``bare``: the
same without a store), and as the plain loop with ``lrviz.track`` (rank 0 records into a store). One torchrun job runs all three in turns, in rounds, so machine noise hits all
alike. Rank 0 times each block from its first step's loss to its last (the script stamps them, the
same in every mode): the wall time, and the CPU time of the training thread (what lrviz's work adds,
even on a machine busy with other work); the driver prints medians and ratios.

Also printed: the CPU time rank 0's store writer thread spends per step (its flushes, timed in its
own thread), which says how much of a difference between ``engine`` and ``bare`` the writer can be.

Goal: engine/plain and track/plain <= 1.03. On a machine busy with other work, the ratio of the
fastest blocks (each mode's least disturbed one) says more than the median of the rounds.

    .venv/bin/python bench/ddp_overhead.py [--rounds 12] [--steps 800] [--width 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
MODES = ("plain", "engine", "bare", "track")

SCRIPT = '''
import time

import torch
from torch import nn

DEFAULTS = {{"lr": 0.01, "optimizer": "sgd", "momentum": 0.9, "seed": 0}}
WIDTH = {width}


def build_model():
    return nn.Sequential(nn.Linear(32, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 1))


def build_data(batch_size=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size * 200, 32, generator=g)
    y = x[:, :1] * 2 + 0.1 * torch.randn(batch_size * 200, 1, generator=g)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


STAMPS = {{}}


def compute_loss(model, batch):
    if model.training:  # the first and the latest training step's start: wall and CPU time of this thread
        now = (time.perf_counter(), time.thread_time())
        STAMPS.setdefault("first", now)
        STAMPS["last"] = now
        STAMPS["n"] = STAMPS.get("n", 0) + 1
    x, y = batch
    return nn.functional.mse_loss(model(x), y)
'''


def per_step(exp) -> tuple[float, float]:
    """Wall and CPU seconds per step between the first and the last step the script saw; resets."""
    st = exp.module.STAMPS
    n = st["n"] - 1
    out = ((st["last"][0] - st["first"][0]) / n, (st["last"][1] - st["first"][1]) / n)
    st.clear()
    return out


def plain(exp, steps: int, rank: int, world: int, track_store: str | None = None) -> tuple[float, float]:
    """Seconds per step of a plain DDP loop (optionally recorded with lrviz.track)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    import lrviz
    from lrviz.engine import seed_everything

    seed_everything(0)
    model = DistributedDataParallel(exp.make_model())
    batches, _ = exp.make_data()
    batches = batches[rank::world][:len(batches) // world]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_of = exp.module.compute_loss
    run = lrviz.track(opt, model=model, store=track_store, quiet=True) if track_store is not None else None
    done = 0
    while done < steps:
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            loss = loss_of(model, (x, y))
            loss.backward()
            opt.step()
            if run is not None:
                run.step(loss)
            else:
                loss.item()  # a plain loop that logs its loss pays this
            done += 1
            if done == steps:
                break
    if run is not None:
        run.finish()
    return per_step(exp)


#: CPU seconds rank 0's store writer thread spent in its flushes (all it does), per engine block's step.
WRITER: list[float] = []


def writer_cpu() -> list[float]:
    """Times every flush of the store writer in its own thread's CPU time; the list gets each block's sum."""
    from lrviz.store.writer import StoreWriter

    spent = [0.0]
    flush = StoreWriter.flush

    def timed(self) -> None:
        t = time.thread_time()
        try:
            flush(self)
        finally:
            spent[0] += time.thread_time() - t

    StoreWriter.flush = timed
    return spent


def engine(exp, steps: int, dist, store, spent: list[float] | None = None) -> tuple[float, float]:
    """Seconds per step of the lrviz engine on this rank (its own first to last step)."""
    from lrviz.config import RunConfig
    from lrviz.engine import TrainingEngine

    cfg = RunConfig(**exp.defaults).merged({"steps": steps, "epochs": None, "device": "cpu"})
    eng = TrainingEngine(exp, cfg, store if dist.is_main else None, distributed=dist)
    if not dist.is_main:
        dist.share(None)  # the plan rank 0's engine sends (lrviz run's other ranks build theirs from it)
    before = spent[0] if spent else 0.0
    eng.run()
    assert eng.state == "finished", eng.error
    wall, cpu = per_step(exp)
    if spent and store is not None:
        WRITER.append((spent[0] - before) / steps)
    EXCHANGES.append(eng._staging.exchanges / (wall * steps))
    return wall, cpu


#: Exchanges a second of each engine block (rank 0 agrees on about one every SYNC_S seconds).
EXCHANGES: list[float] = []


def exchange_cost(dist, rows: int, repeats: int = 300) -> float:
    """Median seconds of one exchange carrying ``rows`` rows (every rank calls this together)."""
    import torch

    from lrviz.control import RunControl
    from lrviz.records import StepBuffer

    ex = dist.staging(StepBuffer(groups=1, capacity=1 << 16), None, RunControl(), check=lambda *rows: None)
    loss, gn2 = torch.tensor(0.5), torch.tensor(1.0)
    times = []
    for _ in range(repeats):
        for _ in range(rows):
            ex.stage(0, 0.0, loss, gn2, [0.01])
        t = time.perf_counter()
        ex.flush(0.0) if rows else ex._exchange([1.0, 0.0, 0.0, 0.0] if dist.is_main else [0.0] * 4)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as tdist

    from lrviz.distributed import Distributed
    from lrviz.experiment import load_experiment
    from lrviz.store.runs import RunStore

    torch.set_num_threads(1)
    tdist.init_process_group("gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    dist = Distributed.attach(torch.device("cpu"))
    exp = load_experiment(args.script)
    spent = writer_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp) / "runs.sqlite") if rank == 0 else None
        track_store = str(Path(tmp) / "track.sqlite") if rank == 0 else ""
        plain(exp, 300, rank, world)  # warm up every path
        engine(exp, 300, dist, store)
        plain(exp, 300, rank, world, track_store)
        for r in range(args.rounds):
            row = {}
            for m in (MODES if r % 2 == 0 else MODES[::-1]):
                tdist.barrier()
                if m == "plain":
                    row[m] = plain(exp, args.steps, rank, world)
                elif m == "engine":
                    row[m] = engine(exp, args.steps, dist, store, spent)
                elif m == "bare":
                    row[m] = engine(exp, args.steps, dist, None)
                else:
                    row[m] = plain(exp, args.steps, rank, world, track_store)
            if rank == 0:
                print("ROUND " + json.dumps(row), flush=True)
        cost = {str(n): exchange_cost(dist, n) for n in (0, 100, 256)}
        if rank == 0:
            print("EXCHANGE " + json.dumps({"cost": cost, "per_s": EXCHANGES, "writer": WRITER}), flush=True)
        if store is not None:
            store.close()
    dist.close()
    tdist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--width", type=int, default=256, help="hidden width of the MLP (the step's weight)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--script", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "ddp_mlp.py"
        script.write_text(SCRIPT.format(width=args.width))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", "--script", str(script), "--rounds", str(args.rounds), "--steps", str(args.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("ROUND ")]
    if proc.returncode != 0 or not rows:
        sys.exit(f"the torchrun job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"torch {torch.__version__}, 2 ranks (gloo, CPU, 1 thread each), python {sys.version.split()[0]}, "
          f"MLP width {args.width}, {args.rounds} rounds of {args.steps} steps")
    for i, label in enumerate(("wall time", "CPU time of rank 0's training thread")):
        print(label + ":")
        base = [r["plain"][i] for r in rows]
        for m in MODES:
            t = [r[m][i] for r in rows]
            ratios = [a / b for a, b in zip(t, base)]
            print(f"  {m:>6}: {statistics.median(t) * 1e6:8.1f} us/step  ratio to plain: median "
                  f"{statistics.median(ratios):.3f}, of the fastest blocks {min(t) / min(base):.3f} "
                  f"(rounds: {', '.join(f'{x:.3f}' for x in ratios)})")
    ex = next(json.loads(line[9:]) for line in proc.stdout.splitlines() if line.startswith("EXCHANGE "))
    print("the exchange (one all-reduce of rank 0's header and every rank's rows; gloo, lrviz's group): "
          + ", ".join(f"{n} rows {t * 1e6:.0f} us" for n, t in ex["cost"].items())
          + f"; the engine made {statistics.median(ex['per_s']):.1f} a second")
    print(f"rank 0's store writer thread (the engine): {statistics.median(ex['writer']) * 1e6:.1f} us CPU per step "
          f"(median of the blocks, every flush included)")
    print("goal: engine and track <= 1.03")


if __name__ == "__main__":
    main()
