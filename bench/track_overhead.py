"""lrviz.track overhead: the same tiny-MLP loop bare, with ``track(store=None)`` (recording only), and
with a store and the live endpoint (what a user gets by default): three identical loops take turns
in short blocks in one process (one torch thread); medians and per-round ratios.

Goal: without a store or listener, <= 1% against the same loop without it.

    .venv/bin/python bench/track_overhead.py [--rounds 60] [--steps 300]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _args import rounds_and_steps
from torch import nn

import lrviz
from lrviz.store.runs import RunStore


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 10, generator=g)
    y = x[:, :1] * 0.5
    return model, opt, x, y


def train(model, opt, batches, steps: int, run) -> None:
    """``steps`` steps of the plain loop, with ``run.step(loss)`` when tracked."""
    for i in range(steps):
        xb, yb = batches[i % len(batches)]
        loss = nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if run is not None:
            run.step(loss)
        else:
            loss.item()  # a bare loop that logs its loss pays this (track reads it on the CPU too)


def blocks(rounds: int, steps: int, store: RunStore) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per step of short blocks, the three modes taking turns on three identical loops.

    Each mode keeps its own model, optimizer and (for the tracked ones) run for the whole
    benchmark, so a block measures only the steps; turns are short, so machine noise hits all alike.
    """
    modes = ("bare", "track", "served")
    state = {}
    for m in modes:
        model, opt, x, y = make()
        run = None
        if m == "track":
            run = lrviz.track(opt, store=None, quiet=True)
        elif m == "served":
            run = lrviz.track(opt, store=store, quiet=True)
        batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 4096, 32)]
        state[m] = (model, opt, run, batches)
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        for m in (modes if r % 2 == 0 else modes[::-1]):
            model, opt, run, batches = state[m]
            t = time.perf_counter()
            c = time.thread_time()
            train(model, opt, batches, steps, run)
            times[m].append((time.perf_counter() - t) / steps)
            cpu[m].append((time.thread_time() - c) / steps)
    for _, _, run, _ in state.values():
        if run is not None:
            run.finish()
    return times, cpu


def same_model(rounds: int, steps: int) -> list[float]:
    """Ratios track/bare of CPU time per step on ONE model, optimizer and data, in alternating blocks: a
    ``track`` (no store, no listener) is made before its block and finished after it, so the block times
    only the steps. Separate model instances differ by themselves by about +-1 % here (their memory
    layout), which this design takes out."""
    model, opt, x, y = make()
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 4096, 32)]
    ratios = []
    for r in range(rounds + 1):
        per = {}
        for m in (("bare", "track") if r % 2 == 0 else ("track", "bare")):
            run = lrviz.track(opt, store=None, quiet=True) if m == "track" else None
            c = time.thread_time()
            train(model, opt, batches, steps, run)
            per[m] = (time.thread_time() - c) / steps
            if run is not None:
                run.finish()
        if r:  # the first round warms up
            ratios.append(per["track"] / per["bare"])
    return ratios


def main() -> None:
    args = rounds_and_steps(__doc__, rounds=60, steps=300)
    modes = ("bare", "track", "served")
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp) / "runs.sqlite")
        blocks(2, 200, store)  # warm up
        times, cpu = blocks(args.rounds, args.steps, store)
        store.close()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, python {sys.version.split()[0]}, "
          f"{args.rounds} rounds of {args.steps} steps")
    for label, table in (("wall time", times), ("CPU time of the training thread", cpu)):
        print(label + ":")
        bare = table["bare"]
        for m in modes:
            med = statistics.median(table[m])
            ratios = [a / b for a, b in zip(table[m], bare)]
            q = statistics.quantiles(ratios, n=4)
            print(f"  {m:>7}: {med * 1e6:6.1f} us/step  ratio to bare: median {statistics.median(ratios):.3f} "
                  f"(quartiles {q[0]:.3f}-{q[2]:.3f})")
    same = same_model(args.rounds, args.steps)
    q = statistics.quantiles(same, n=4)
    print(f"one model, alternating blocks (CPU time of the training thread): track/bare median "
          f"{statistics.median(same):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})")
    print("goal: track (no store, no listener) <= 1.01")


if __name__ == "__main__":
    main()
